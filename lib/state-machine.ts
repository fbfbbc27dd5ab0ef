// A guarded state machine: the states and the changes allowed between them
// are named once, in a table; every change is checked against it and logged.
import { ErrorCode, PostcopyError } from './errors.js';
import type { Logger } from './logger.js';

export type TransitionTable<S extends string> = { readonly [from in S]: readonly S[] };

export class StateMachine<S extends string> {
  readonly #table: TransitionTable<S>;
  readonly #log: Logger;
  readonly #what: string;
  #state: S;
  #since = Date.now();
  readonly #listeners: ((to: S, from: S) => void)[] = [];
  readonly #warns: (to: S, from: S) => boolean;

  /** `warns`: which changes are warnings (default: into `paused`); every other change is logged at info. */
  constructor(what: string, initial: S, table: TransitionTable<S>, log: Logger, warns: (to: S, from: S) => boolean = (to) => to === 'paused') {
    this.#what = what;
    this.#warns = warns;
    this.#state = initial;
    this.#table = table;
    this.#log = log;
    log.info({ state: initial }, `${what} state`);
  }

  get state(): S {
    return this.#state;
  }

  /** Milliseconds spent in the current state. */
  get elapsedMs(): number {
    return Date.now() - this.#since;
  }

  is(...states: S[]): boolean {
    return states.includes(this.#state);
  }

  can(to: S): boolean {
    return this.#table[this.#state].includes(to);
  }

  /** Moves to `to`; throws ERR_INVALID_TRANSITION when the table does not allow it. */
  to(to: S, details: Record<string, unknown> = {}): void {
    const from = this.#state;
    if (!this.can(to)) throw new PostcopyError(ErrorCode.INVALID_TRANSITION, `${this.#what}: ${from} -> ${to} is not allowed`);
    const inStateMs = this.elapsedMs;
    this.#state = to;
    this.#since = Date.now();
    // A failure is reported once, as an error, by whoever owns it (the CLI, the
    // handler, the caller's rejected promise); here it is only a state change.
    const level = this.#warns(to, from) ? 'warn' : 'info';
    // The change itself last: details never hide which state this is (a status with a `state` of its own).
    this.#log[level]({ ...details, from, state: to, inStateMs }, `${this.#what} state`);
    for (const listener of this.#listeners) listener(to, from);
  }

  /** Calls `listener` after every change. */
  onChange(listener: (to: S, from: S) => void): void {
    this.#listeners.push(listener);
  }
}
