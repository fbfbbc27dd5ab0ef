// One destination's session on the source: its state machine, its data
// channels, and the native page-server threads that serve it.
//
// A session outlives its connections: when the control channel breaks or goes
// silent while pages flow, the session pauses (its threads stop) and waits a
// grace period for the destination to come back with the session id; a resume
// starts new threads from the destination's bitmap of pages it holds.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { closeSync } from 'node:fs';
import { native, type NativeEvent, type NativePageServerSession, type SourceStats } from '../lib/native.js';
import { ErrorCode, PostcopyError, errorOfEvent, type CodedError } from '../lib/errors.js';
import { StateMachine, type TransitionTable } from '../lib/state-machine.js';
import type { TransferOptions } from '../lib/transfer.js';
import type { DataChannelKeys } from '../lib/protocol.js';
import type { Logger } from '../lib/logger.js';
import type { Image } from '../lib/image.js';

/**
 * setup: channels attach; active: pages flow; paused: the destination is gone
 * and may come back; resuming: it came back, channels attach again;
 * completed: the destination has every page; failed: it broke the protocol.
 */
export type SessionState = 'setup' | 'active' | 'paused' | 'resuming' | 'completed' | 'failed' | 'closed';
export type Channel = 'urgent' | 'bulk';
/** Channels a destination attaches: the two data channels, and `memory` (the image's fds, taken in place). */
export type AttachChannel = Channel | 'memory';

const TRANSITIONS: TransitionTable<SessionState> = {
  setup: ['active', 'failed', 'closed'],
  active: ['paused', 'completed', 'failed', 'closed'],
  paused: ['resuming', 'closed'],
  resuming: ['active', 'paused', 'failed', 'closed'],
  completed: ['paused', 'closed'],
  failed: ['closed'],
  closed: [],
};

/** Every state of a SourceSession, in the table's order. */
export const SESSION_STATES = Object.keys(TRANSITIONS) as readonly SessionState[];

/** How long a paused session waits for its destination by default. */
export const DEFAULT_RESUME_GRACE_MS = 60_000;

// Counters that add up over the runs of a resumed session (pagesSent does
// not: each run starts from what the destination holds).
const RUNNING_TOTALS = [
  'requests',
  'pagesRequested',
  'pagesResent',
  'pagesAlreadyInFlight',
  'pagesWindow',
  'pagesBackground',
  'pagesPrefetched',
  'zeroPages',
  'bytesSent',
  'packedRuns',
  'packedRawBytes',
  'packedWireBytes',
] as const;

/** What a session starts with (SourceSession.start). */
export interface SessionStart {
  transfer: TransferOptions;
  /** Pages the destination holds already: never sent. */
  have?: { region: number; bitmap: Uint8Array }[];
  /** Sealed data channels (TCP). */
  keys?: DataChannelKeys;
  /** A working set the destination replays (client/working-set.ts entries), streamed in order ahead of the background. */
  prefetch?: Uint8Array[];
  /** Each region's unit in pages (its window's huge-page unit). */
  units?: number[];
  /** A live source's precopy: the native session starts in precopy and its events ('round-sent', 'switched-over') come here. */
  onPrecopyEvent?: (event: NativeEvent) => void;
  /** With precopy: the destination answers each discard round's mark (options.discardMarks). */
  discardMarks?: boolean;
  /** Release as sent: the most pages sent and not yet confirmed installed (0: no bound). */
  unconfirmedBudget?: number;
  /** The destination takes packed runs (options.packedRuns names zstd). */
  packRuns?: boolean;
}

export class SourceSession {
  readonly id = randomBytes(16).toString('hex');
  readonly startedAt = Date.now();
  tickets: Record<AttachChannel, Buffer> = { urgent: randomBytes(32), bulk: randomBytes(32), memory: randomBytes(32) };
  /** How many times the destination came back. */
  resumes = 0;
  /** The welcome offered the image's memory in place (a `memory` attach may come). */
  memoryOffered = false;
  readonly #machine: StateMachine<SessionState>;
  #fds: Partial<Record<Channel, number>> = {};
  #native: NativePageServerSession | null = null;
  #earlier: SourceStats | null = null; // the sum of finished runs
  #graceTimer: NodeJS.Timeout | null = null;
  /** A live source's migration, told of the precopy events. */
  #onPrecopyEvent: ((event: NativeEvent) => void) | null = null;
  #discardMarks = false;
  readonly #image: Image;
  readonly #log: Logger;
  readonly #onFailure: (err: CodedError) => void;

  constructor(image: Image, log: Logger, onFailure: (err: CodedError) => void) {
    this.#image = image;
    this.#log = log.child({ session: this.id });
    this.#onFailure = onFailure;
    this.#machine = new StateMachine('session', 'setup', TRANSITIONS, this.#log);
  }

  get state(): SessionState {
    return this.#machine.state;
  }

  /** Checks a data channel's ticket; throws unless this channel may attach now. */
  verifyAttach(channel: AttachChannel, ticket: unknown): void {
    if (!this.#machine.is('setup', 'resuming'))
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `cannot attach a channel to a session that is ${this.state}`);
    if (channel !== 'memory' && this.#fds[channel] !== undefined)
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `the ${channel} channel is already attached`);
    const expected = this.tickets[channel];
    if (!(ticket instanceof Uint8Array) || ticket.length !== expected.length || !timingSafeEqual(expected, ticket)) {
      throw new PostcopyError(ErrorCode.AUTH_FAILED, `wrong ticket for the ${channel} channel`);
    }
  }

  /**
   * Takes ownership of a verified data channel's fd. `ticket` is the one it
   * was verified with: a resume that issued new tickets meanwhile refuses it.
   */
  adoptChannel(channel: Channel, fd: number, ticket: Uint8Array): void {
    const current = this.tickets[channel];
    const stale = ticket.length !== current.length || !timingSafeEqual(current, ticket);
    if (stale || !this.#machine.is('setup', 'resuming') || this.#fds[channel] !== undefined) {
      closeSync(fd);
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `the ${channel} channel can no longer attach`);
    }
    this.#fds[channel] = fd;
    this.#log.debug({ channel }, 'data channel attached');
  }

  /** Starts the native threads over both attached data channels. */
  start({
    transfer: options,
    have = [],
    keys,
    prefetch = [],
    units = [],
    onPrecopyEvent,
    discardMarks = false,
    unconfirmedBudget = 0,
    packRuns = false,
  }: SessionStart): void {
    if (this.#fds.urgent === undefined || this.#fds.bulk === undefined) {
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'start before both data channels were attached');
    }
    const urgentFd = this.#fds.urgent;
    const bulkFd = this.#fds.bulk;
    this.#fds = {};
    try {
      this.#native = new native.PageServerSession({
        regions: this.#image.regions.map((r, i) => ({ ...r.spec, unit: units[i] ?? 1 })),
        urgentFd,
        bulkFd,
        windowForward: options.window.forward,
        windowBackward: options.window.backward,
        background: options.background.enabled,
        rateBytesPerSecond: options.background.rateBytesPerSecond,
        ...(keys ? { keys } : {}),
        ...(onPrecopyEvent ? { precopy: true, discardMarks } : {}),
        ...(unconfirmedBudget > 0 ? { unconfirmedBudget } : {}),
        ...(packRuns ? { packRuns } : {}),
        onEvent: (event) => this.#onNativeEvent(event),
      });
    } catch (err) {
      closeSync(urgentFd);
      closeSync(bulkFd);
      throw err;
    }
    for (const h of have) this.#native.markHeld(h.region, h.bitmap);
    for (const entries of prefetch) this.#native.prefetch(entries); // streamed before any background run
    const held = this.#native.stats().pagesSent;
    this.#onPrecopyEvent = onPrecopyEvent ?? null;
    this.#discardMarks = discardMarks;
    this.#native.start();
    this.#machine.to('active', { options, pagesHeld: held, encryption: keys ? 'aes-256-gcm' : 'none' });
  }

  /** Release-as-sent: the destination holds these pages for good (a piece of its held bitmap): they leave the unconfirmed budget. */
  confirmInstalled(region: number, offset: number, bitmap: Uint8Array): void {
    this.#native?.confirm(region, offset, bitmap);
  }

  /** The destination held the background stream back (while it recorded its working set): it starts now. */
  startBackground(): void {
    if (!this.#native) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `background while the session is ${this.state}`);
    this.#native.startBackground();
    this.#log.info('the destination started the background stream');
  }

  /** A live source's precopy: pages to send now (server/live.ts Ranges, encoded). */
  precopyRound(ranges: Uint8Array): void {
    if (!this.#native) throw new PostcopyError(ErrorCode.ENGINE_STATE, `a precopy round while the session is ${this.state}`);
    this.#native.precopyRound(ranges);
  }

  /** The destination answers each discard round once it is applied (`dropped`). */
  get acksDiscards(): boolean {
    return this.#discardMarks;
  }

  /** A live source, its workload still running: of these pages (written since sent), the destination drops those it holds now. */
  discardRound(ranges: Uint8Array): void {
    if (!this.#native) throw new PostcopyError(ErrorCode.ENGINE_STATE, `a discard round while the session is ${this.state}`);
    this.#native.discardRound(ranges);
  }

  /** A live source, its workload paused: the pages written since the last round; the destination runs once they are discarded. */
  switchover(written: Uint8Array): void {
    if (!this.#native) throw new PostcopyError(ErrorCode.ENGINE_STATE, `a switchover while the session is ${this.state}`);
    this.#native.switchover(written);
  }

  /** The figures of every run of this session so far. */
  stats(): SourceStats | null {
    return this.#native ? this.#withEarlierRuns(this.#native.stats()) : this.#earlier;
  }

  #withEarlierRuns(run: SourceStats): SourceStats {
    if (this.#earlier) for (const k of RUNNING_TOTALS) run[k] += this.#earlier[k];
    return run;
  }

  complete(): void {
    if (this.#machine.is('active')) this.#machine.to('completed', { stats: this.stats() });
  }

  /**
   * The control channel broke or went silent. A session that was serving
   * pauses and waits `graceMs` for the destination to come back; one that never
   * started ends.
   */
  connectionLost(reason: string, graceMs: number, onExpired: () => void): void {
    if (this.#machine.is('closed', 'paused')) return;
    if (this.#machine.is('setup', 'failed')) return this.close(reason);
    this.#stopNative();
    for (const fd of Object.values(this.#fds)) closeSync(fd);
    this.#fds = {};
    this.#machine.to('paused', { reason, graceMs });
    this.#graceTimer = setTimeout(() => {
      this.#log.warn({ graceMs }, 'the destination did not come back in time');
      this.close('resume grace period over');
      onExpired();
    }, graceMs);
    this.#graceTimer.unref();
  }

  /** The destination came back with this session's id: new tickets, channels attach again. */
  resume(): void {
    if (this.#graceTimer) clearTimeout(this.#graceTimer);
    this.#graceTimer = null;
    this.tickets = { urgent: randomBytes(32), bulk: randomBytes(32), memory: randomBytes(32) };
    this.resumes++;
    this.#machine.to('resuming', { resumes: this.resumes });
  }

  get resumable(): boolean {
    return this.#machine.is('paused');
  }

  /** Stops the threads and closes every fd; idempotent. */
  close(reason: string): void {
    if (this.#graceTimer) clearTimeout(this.#graceTimer);
    this.#graceTimer = null;
    this.#stopNative();
    for (const fd of Object.values(this.#fds)) closeSync(fd);
    this.#fds = {};
    if (!this.#machine.is('closed')) this.#machine.to('closed', { reason, stats: this.stats() });
  }

  #stopNative(): void {
    if (!this.#native) return;
    const run = this.#native;
    this.#native = null;
    run.stop(); // joins the threads, so the final figures are complete
    this.#earlier = this.#withEarlierRuns(run.stats());
  }

  #onNativeEvent(event: NativeEvent): void {
    try {
      if (event.type === 'round-sent' || event.type === 'discard-round-sent' || event.type === 'switched-over') {
        this.#onPrecopyEvent?.(event);
        return;
      }
      if (event.type === 'background-done') {
        this.#log.info({ afterMs: Math.round((this.#native?.stats().backgroundDoneNs ?? 0) / 1e6) }, 'background transfer sent every page');
        return;
      }
      // The destination leaving (EOF, or a write that finds it gone) is seen
      // on its control channel, which pauses or ends the session; only
      // violations fail it.
      const departure = event.type === 'closed' || ['EPIPE', 'ECONNRESET'].includes(event.code ?? '');
      if (departure) {
        this.#log.info({ channel: event.channel, code: event.code }, 'the destination closed a data channel');
        return;
      }
      const err = errorOfEvent(event, event.message ?? event.type, ErrorCode.PEER_GONE, { channel: event.channel });
      if (this.#machine.is('active'))
        this.#machine.to('failed', { code: err.code, errno: err.errno, syscall: err.syscall, channel: event.channel, error: err.message });
      this.#onFailure(err);
    } catch (err) {
      this.#log.error({ err }, 'handling a native event failed');
    }
  }
}
