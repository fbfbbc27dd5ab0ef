// What a page server has served, for metrics: sessions by state now, totals
// over every session since start (those forgotten are kept summed), errors by
// code.
import { Tally } from '../lib/metrics.js';
import type { SourceStats } from '../lib/native.js';
import { SESSION_STATES } from './session.js';

/** The running totals a server keeps over its sessions (lib/native.ts SourceStats). */
const SERVED_TOTALS = ['requests', 'pagesRequested', 'pagesResent', 'pagesWindow', 'pagesBackground', 'pagesPrefetched', 'zeroPages', 'bytesSent'] as const;

type Totals = Record<(typeof SERVED_TOTALS)[number], number>;

/** PageServer.figures(): sessions by state now (every state, 0 when none is in it), totals since start, errors by code. */
export type ServerFigures = { sessions: Record<string, number>; errors: [string, number][] } & Totals;

/** A session as the figures see it. */
export interface Served {
  readonly state: string;
  stats(): SourceStats | null;
}

export class ServedFigures {
  /** Errors by code, for the life of the server. */
  readonly #errors = new Tally();
  /** The figures of sessions already forgotten, summed. */
  readonly #retired = Object.fromEntries(SERVED_TOTALS.map((k) => [k, 0])) as Totals;

  error(code: string): void {
    this.#errors.add(code);
  }

  /** A session leaves the table: its figures stay in the totals. */
  retire(session: Served): void {
    this.#add(this.#retired, session.stats());
  }

  /** The figures now, with the sessions still held. */
  of(sessions: Iterable<Served>): ServerFigures {
    const totals = { ...this.#retired };
    const byState: Record<string, number> = Object.fromEntries(SESSION_STATES.map((state) => [state, 0]));
    for (const session of sessions) {
      byState[session.state] = (byState[session.state] ?? 0) + 1;
      this.#add(totals, session.stats());
    }
    return { sessions: byState, ...totals, errors: this.#errors.entries() };
  }

  #add(totals: Totals, stats: SourceStats | null): void {
    if (stats) for (const k of SERVED_TOTALS) totals[k] += stats[k];
  }
}
