// One destination session: a fault engine over memory (ours, or a VMM's) fed
// by a source, with its states named once and changed only through the table
// below. A restore (Destination) and each VMM of the handler (VmmHandler) are
// thin users of it.
//
// When anything breaks (a data channel ends or errs, the control channel goes
// quiet, pages stop arriving while they are due, the digest does not come) the
// session pauses: the engine keeps the userfaultfd, the received bitmap and
// the unanswered requests, and faulting threads simply wait. It then
// reconnects by itself, by the loop and backoff that made the first
// connection (#attempt), proves the token again, presents its
// session id and the pages it holds, and the engine re-sends its unanswered
// requests first. A source that serves a different image is refused. Only a
// give-up time, when one is set, ends an outage in failure; an outage ends
// only with progress toward a verified end (pages arriving, the digest), never
// with a mere reconnection.
import { EventEmitter } from 'node:events';
import { ErrorCode, PostcopyError, asCodedError, type CodedError } from '../lib/errors.js';
import { type Address, formatAddress, parseAddress } from '../lib/address.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { MAX_RUN_BYTES } from '../lib/limits.js';
import { DEFAULT_HEARTBEAT, type Heartbeat, type MessageOf, type RegionInfo, type VerifyRequest } from '../lib/protocol.js';
import { StateMachine, type TransitionTable } from '../lib/state-machine.js';
import { transferOptions, type TransferOptions } from '../lib/transfer.js';
import { SourceConnection, type SourceOptions } from './source-connection.js';
import type { ChannelFailure, DestinationStats, FaultEngine, LocalImageSupply, StoreImageSupply, TemplateSupply } from './fault-engine.js';
import { checkReplay, type WorkingSet } from './working-set.js';

/**
 * connecting: the first connection (its attempts, the source then each
 * replica, and the backoff between rounds); running: pages flow; paused: the source is out
 * of reach, faults wait; resuming: reconnecting; resident: every page is in;
 * verified: the source's digest matched; failed: given up; closed: torn down.
 */
export type DestinationState = 'connecting' | 'running' | 'paused' | 'resuming' | 'resident' | 'verified' | 'failed' | 'closed';

/** What a source answers at start that asking again would not change: refused, not an outage. */
const REFUSALS_AT_START = new Set<string>([
  ErrorCode.UNSUPPORTED,
  ErrorCode.IMAGE_CONSUMED,
  ErrorCode.IMAGE_MISMATCH,
  ErrorCode.AUTH_FAILED,
  ErrorCode.WORKLOAD_GONE,
]);

const TRANSITIONS: TransitionTable<DestinationState> = {
  connecting: ['running', 'resident', 'paused', 'failed', 'closed'],
  running: ['paused', 'resident', 'failed', 'closed'],
  paused: ['resuming', 'failed', 'closed'],
  resuming: ['running', 'resident', 'paused', 'failed', 'closed'],
  resident: ['paused', 'verified', 'failed', 'closed'],
  verified: ['closed'],
  failed: ['closed'],
  closed: [],
};

/** Every state of a DestinationSession, in the table's order. */
export const DESTINATION_STATES = Object.keys(TRANSITIONS) as readonly DestinationState[];

/** How failures are detected and recovered from. Defaults suit a data centre. */
export interface RecoveryOptions {
  /** Control-channel heartbeats (default: each second; silent after 5 s). */
  heartbeat?: Heartbeat;
  /** No byte on the data channels for this long while pages are due means the link is stuck (default 5 s). */
  stallTimeoutMs?: number;
  /** The source must answer `done` with its digest within this (default 60 s). */
  digestTimeoutMs?: number;
  /** Each connection attempt's handshake steps are bounded by this (default 10 s). */
  connectTimeoutMs?: number;
  /** Reconnect backoff: first delay, doubled up to the max (default 100 ms to 5 s). */
  retryDelayMs?: { initial: number; max: number };
  /** Fail once the source has been out of reach this long (default: never; keep retrying). */
  giveUpAfterMs?: number;
}

/** Replaying and recording working sets (client/working-set.ts). */
export interface ReplayOptions {
  /** A working set to install first, in its order, ahead of the background; refused (ERR_WORKING_SET_MISMATCH) unless it fits the image. */
  prefetch?: WorkingSet;
  /** Hold the background back until startBackground() (while a working set is recorded, so it cannot hide the pages touched). */
  holdBackground?: boolean;
}

/**
 * What a restore or a VMM handler needs of its session, wherever the pages
 * come from: a source process (DestinationSession) or a local image
 * (LocalSession, client/local-session.ts). Events: 'failed' (CodedError),
 * 'state' (to, from); a DestinationSession also 'paused' and 'resumed'.
 */
export interface PageSession extends EventEmitter {
  readonly engine: FaultEngine;
  readonly transfer: TransferOptions;
  readonly regions: RegionInfo[];
  /** Identifies the image the pages come from (lib/digest.ts). */
  readonly fingerprint: string;
  readonly state: string;
  status(): RecoveryStatus;
  stats(): DestinationStats;
  finalStats(): DestinationStats;
  whenResident(): Promise<void>;
  /** Resolves once the workload may run on this memory: at once, or, from a live source, at its switchover. */
  whenRunning(): Promise<void>;
  exchangeDigest(stats: Record<string, unknown>, verify?: VerifyRequest): Promise<MessageOf<'digest'>>;
  verified(details?: Record<string, unknown>): void;
  release(): void;
  fail(err: CodedError): void;
  startBackground(): void;
  close(): void;
}

export interface DestinationSessionOptions extends SourceOptions, ReplayOptions {
  recovery?: RecoveryOptions;
  /**
   * Keep trying the first connection too, as after a pause (until the
   * give-up time, when one is set). Default: a first connection that fails is
   * an error (a restore has nothing to lose yet). A VMM's handler sets it: the
   * guest is already waiting.
   */
  retryFirstConnect?: boolean;
  /** Stops a first connection still being retried. */
  signal?: AbortSignal;
  /**
   * Other sources serving the same image (replicas). When the current source
   * is out of reach, each later attempt goes to the next address in turn
   * (source, replicas..., source, ...); each must prove it serves the same
   * image (its fingerprint), and resumes from the pages already held.
   */
  replicas?: readonly (string | Address)[];
}

/**
 * Builds (and starts) the engine over the caller's memory once the image's
 * regions are known; `local`, when the pages come from a local image or a
 * template, goes into the engine's options as they are. `precopy`: a live
 * source sends precopy rounds first (the engine's `precopy` option).
 */
export type EngineFactory = (regions: RegionInfo[], local?: LocalImageSupply | TemplateSupply | StoreImageSupply, precopy?: boolean) => FaultEngine;

/** What the session reports about its recoveries (also part of every report). */
export interface RecoveryStatus {
  state: DestinationState;
  session: string;
  source: string;
  resumes: number;
  pausedMs: number;
  lastError?: { code: string; message: string };
}

interface Resolved {
  heartbeat: Heartbeat;
  stallTimeoutMs: number;
  digestTimeoutMs: number;
  connectTimeoutMs: number;
  retryDelayMs: { initial: number; max: number };
  giveUpAfterMs: number;
}

/** One connection to a source, from the attempt that made it: its data channels in the engine once attached. */
interface Link {
  readonly connection: SourceConnection;
  /** The engine's generation of this link's data channels; -1 until attached, and once detached. */
  generation: number;
  /** A channel failed while the link was still starting (#begin): there was no running session to pause yet. */
  earlyFailure: CodedError | null;
  /** Release-as-sent: reports the pages held to the source now. */
  reportNow: (() => void) | null;
}

/**
 * From the first connection's start, or from a pause, until pages flow again:
 * one retry loop (#attempt), one backoff, one give-up time.
 */
interface Outage {
  readonly since: number;
  /** The first connection's: ends when the source first answers, and is no outage in the figures. */
  readonly first: boolean;
  attempts: number;
  /** Rounds over the source and its replicas that failed: the backoff doubles with each. */
  failedRounds: number;
  retryTimer: NodeJS.Timeout | null;
  giveUpTimer: NodeJS.Timeout | null;
  /** The connection the last attempt made (named in the log when the outage ends). */
  resumedOn: SourceConnection | null;
}

/** What the first welcome fixed: the image every later source must serve, and the engine over the caller's memory. */
interface Welcomed {
  readonly engine: FaultEngine;
  readonly regions: RegionInfo[];
  readonly fingerprint: string;
  readonly content: string | undefined;
  /** A live source sends precopy rounds; the workload runs here once its switchover marker came. */
  readonly precopy: boolean;
}

/**
 * Events: 'paused' (CodedError), 'resumed' ({outageMs, attempts}),
 * 'failed' (CodedError): given up, and 'state' (to, from).
 */
export class DestinationSession extends EventEmitter implements PageSession {
  readonly transfer: TransferOptions;
  readonly #machine: StateMachine<DestinationState>;
  readonly #log: Logger;
  readonly #options: DestinationSessionOptions;
  readonly #recovery: Resolved;
  readonly #buildEngine: EngineFactory;
  /** The source and its replicas, tried in turn while out of reach. */
  readonly #sources: Address[];
  #source: Address;
  #sessionId = '';
  #welcomed: Welcomed | null = null;
  /** The link pages flow on (null while out of reach, and once released). */
  #link: Link | null = null;
  #outage: Outage | null = null;
  /** Settles open(): the first connection started (or paused once the engine held the memory), or it was given up. */
  readonly #opened: { promise: Promise<void>; resolve: () => void; reject: (e: CodedError) => void };
  /** The watchdog's view of progress. */
  #progress = { lastBytes: 0, at: Date.now() };
  #watchdog: NodeJS.Timeout | null = null;
  #resumes = 0;
  #pausedMs = 0;
  #lastError: CodedError | null = null;
  /** Why the session failed (fail()): what every wait rejects with after. */
  #failure: CodedError | null = null;
  /** The background stream is held back (holdBackground) until startBackground(). */
  #backgroundHeld: boolean;
  #switchedOver = false;

  private constructor(options: DestinationSessionOptions, buildEngine: EngineFactory) {
    super();
    this.#options = options;
    this.#buildEngine = buildEngine;
    this.#log = options.logger ?? silentLogger;
    this.#recovery = resolveRecovery(options.recovery);
    this.transfer = transferOptions(options);
    this.#sources = sourcesOf(options);
    this.#source = this.#sources[0];
    this.#backgroundHeld = options.holdBackground === true;
    // A pause is a warning once; each failed attempt of its outage is one warning line of its own (#attemptFailed).
    this.#machine = new StateMachine<DestinationState>(
      'destination',
      'connecting',
      TRANSITIONS,
      this.#log,
      (to, from) => to === 'paused' && from !== 'resuming',
    );
    this.#machine.onChange((to, from) => this.emit('state', to, from));
    let settle!: { resolve: () => void; reject: (e: CodedError) => void };
    const promise = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
    this.#opened = { promise, ...settle };
    options.signal?.addEventListener('abort', () => this.#onAbort(), { once: true });
  }

  /**
   * Connects to the source, has `buildEngine` make the engine over the
   * caller's memory for the source's regions, and starts the transfer.
   * The first connection is made by the same loop as every resume: the
   * source, then each replica; a round that fails is an error (nothing to
   * lose yet), unless retryFirstConnect: then rounds go on, with the backoff,
   * until the give-up time. Once the source has answered and the engine holds
   * the caller's memory, a broken link is a pause (the session is returned
   * paused), unless the source refused.
   */
  static async open(options: DestinationSessionOptions, buildEngine: EngineFactory): Promise<DestinationSession> {
    const session = new DestinationSession(options, buildEngine);
    // The give-up time bounds a first connection only when it is retried; else one round over the addresses does.
    session.#startOutage(true, options.retryFirstConnect === true);
    void session.#attempt();
    await session.#opened.promise;
    return session;
  }

  get engine(): FaultEngine {
    if (!this.#welcomed) throw new PostcopyError(ErrorCode.ENGINE_STATE, 'the session has no engine before the source first answers');
    return this.#welcomed.engine;
  }

  get state(): DestinationState {
    return this.#machine.state;
  }

  get fingerprint(): string {
    return this.#welcomed?.fingerprint ?? '';
  }

  /** The source's regions, as first welcomed. */
  get regions(): RegionInfo[] {
    return this.#welcomed?.regions ?? [];
  }

  status(): RecoveryStatus {
    const outage = this.#outage && !this.#outage.first ? Date.now() - this.#outage.since : 0;
    return {
      state: this.state,
      session: this.#sessionId,
      source: formatAddress(this.#source),
      resumes: this.#resumes,
      pausedMs: this.#pausedMs + outage,
      ...(this.#lastError ? { lastError: { code: this.#lastError.code, message: this.#lastError.message } } : {}),
    };
  }

  stats(): DestinationStats {
    return this.engine.stats();
  }

  /** Every page is resident: stops the receivers (the channels are no longer needed) and returns figures that no thread still moves. */
  finalStats(): DestinationStats {
    this.engine.detachChannels();
    return this.engine.stats();
  }

  /** Starts the background stream that holdBackground held back, now and on every later connection. */
  startBackground(): void {
    if (!this.#backgroundHeld) return;
    this.#backgroundHeld = false;
    this.#link?.connection.startBackground();
    this.#log.info('background stream started');
  }

  /** Points later reconnection attempts at another address (e.g. the source moved); takes effect at the next attempt. */
  redirect(source: string | Address): void {
    this.#source = typeof source === 'string' ? parseAddress(source) : source;
    this.#log.warn({ source: formatAddress(this.#source) }, 'the source is now reached at a new address');
  }

  /** Resolves once every page is resident; rejects when the session fails or closes first. */
  whenResident(): Promise<void> {
    return whenState(this, ['resident', 'verified'], () => this.#failure ?? sessionClosed(this.#lastError));
  }

  whenRunning(): Promise<void> {
    if (!this.#welcomed?.precopy || this.#switchedOver) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const onState = () => {
        if (!this.#machine.is('failed', 'closed')) return;
        this.off('running', onRunning);
        this.off('state', onState);
        reject(this.#failure ?? sessionClosed(this.#lastError));
      };
      const onRunning = () => {
        this.off('state', onState);
        resolve();
      };
      this.once('running', onRunning);
      this.on('state', onState);
    });
  }

  /**
   * Tells the source every page is resident and returns its digest. A
   * connection that fails on the way (or a digest that does not come in time)
   * pauses the session; the question is asked again once it is back.
   */
  async exchangeDigest(stats: Record<string, unknown>, verify?: VerifyRequest): Promise<MessageOf<'digest'>> {
    for (;;) {
      await this.whenResident();
      const link = this.#link;
      if (!link) throw new PostcopyError(ErrorCode.SESSION_CLOSED, 'the source connection was already released by this session');
      try {
        const digest = await link.connection.finish(stats, this.#recovery.digestTimeoutMs, verify);
        // The connection may have failed in the same breath (the digest and an error in one read): ask again then.
        if (this.#link === link && this.#machine.is('resident')) {
          this.#outageOver(); // the digest came: the outage (if any) is over
          return digest;
        }
      } catch (err) {
        if (this.#link === link) this.#pause(asCodedError(err));
      }
    }
  }

  /** The source's digest matched: the session is done with the source. */
  verified(details: Record<string, unknown> = {}): void {
    if (!this.#machine.can('verified')) return;
    this.release();
    this.#machine.to('verified', details);
  }

  /** Says bye to the source (every page is resident); the session stays up for its memory's owner. */
  release(): void {
    const link = this.#dropLink();
    link?.connection.close();
  }

  /** Ends the session in failure (e.g. the digest did not match). */
  fail(err: CodedError): void {
    if (!this.#machine.can('failed')) return;
    this.#endOutage();
    this.#lastError = this.#failure = err;
    this.#dropLink()?.connection.abandon();
    this.#machine.to('failed', { code: err.code, error: err.message });
    this.emit('failed', err);
  }

  /** Stops the engine and drops the connection. The memory and its userfaultfd stay the caller's. */
  close(): void {
    if (this.#machine.is('closed')) return;
    this.#endOutage();
    if (this.#watchdog) clearInterval(this.#watchdog);
    this.#dropLink()?.connection.close();
    this.#welcomed?.engine.stop();
    this.#machine.to('closed', this.status() as unknown as Record<string, unknown>);
    this.#opened.reject(sessionClosed(this.#lastError));
  }

  // ---- connecting: the first connection and every resume ----

  /** One attempt on the current address: connect (resuming the session once there is one), check, and start from what we hold. */
  async #attempt(): Promise<void> {
    const outage = this.#outage;
    if (!outage) return;
    outage.retryTimer = null;
    const first = this.#welcomed === null;
    if (!this.#machine.is(first ? 'connecting' : 'paused')) return;
    outage.attempts++;
    const source = this.#source;
    if (!first) this.#machine.to('resuming', { attempt: outage.attempts, source: formatAddress(source) });
    const during: DestinationState = first ? 'connecting' : 'resuming';
    let link: Link | null = null;
    try {
      const connection = await SourceConnection.open({
        source,
        token: this.#options.token,
        transfer: this.transfer,
        holdBackground: this.#backgroundHeld,
        ...(this.#options.pageSizesFor ? { pageSizesFor: this.#options.pageSizesFor } : {}),
        ...(first ? (this.#options.precopy ? { precopy: true } : {}) : { resume: this.#sessionId }),
        maxImageBytes: this.#options.maxImageBytes,
        acceptPlaintextTcp: this.#options.acceptPlaintextTcp,
        refusePackedRuns: this.#options.refusePackedRuns,
        timeoutMs: this.#recovery.connectTimeoutMs,
        heartbeat: this.#recovery.heartbeat,
      });
      link = { connection, generation: -1, earlyFailure: null, reportNow: null };
      if (!this.#machine.is(during)) {
        connection.close(); // closed or given up meanwhile
        return;
      }
      if (first) this.#welcome(connection);
      else this.#checkIdentity(connection);
      this.#link = link;
      this.#sessionId = connection.session;
      if (this.#outage) this.#outage.resumedOn = connection;
      // Back in "resident" is no progress: the outage lasts until the digest comes (exchangeDigest), or the give-up time.
      await this.#begin(link);
      if (first) {
        const regions = this.regions;
        this.#log.info(
          { session: connection.session, regions: regions.length, bytes: regions.reduce((n, r) => n + r.length, 0), ...this.transfer },
          'transfer started',
        );
        this.#opened.resolve();
      }
    } catch (err) {
      const e = asCodedError(err);
      if (link && this.#link === link) this.#link = null;
      link?.connection.abandon();
      if (link) this.#detach(link); // whatever this attempt attached, unless replaced since
      if (!this.#machine.is(during)) return; // closed, given up, or already paused again
      this.#attemptFailed(e, first, source);
    }
  }

  /** The first welcome: the image every later source must serve, and the engine over the caller's memory (its failure is final). */
  #welcome(connection: SourceConnection): void {
    const options = this.#options;
    this.#endOutage(); // the source answered: nothing of the first connection's wait counts as an outage
    let engine: FaultEngine;
    try {
      if (options.prefetch) checkReplay(options.prefetch, connection.regions, connection.fingerprint, this.#log);
      engine = this.#buildEngine(connection.regions, undefined, connection.live && options.precopy === true);
    } catch (err) {
      connection.close();
      this.#finalAtStart(asCodedError(err));
      throw err;
    }
    // The first connection may have been made to a replica.
    this.#source = this.#sources.find((a) => formatAddress(a) === connection.address) ?? this.#sources[0];
    this.#backgroundHeld = connection.backgroundHeld;
    this.#welcomed = {
      engine,
      regions: connection.regions,
      fingerprint: connection.fingerprint,
      content: connection.content,
      precopy: connection.live && options.precopy === true,
    };
    engine.on('channel-failed', (f: ChannelFailure) => this.#onChannelFailed(f));
    engine.on('discards-dropped', (round: number) => this.#link?.connection.reportDropped(round));
    engine.on('switchover', (e: { discarded: number; rewritten: number }) => {
      this.#switchedOver = true;
      this.#link?.connection.reportRunning();
      this.#log.info({ ...e, precopiedPages: engine.stats().pagesPrecopied }, 'the live source switched over: the workload runs here now');
      this.emit('running');
    });
    engine.on('complete', () => {
      this.#link?.reportNow?.(); // release-as-sent: the last pages are ours before anyone says done
      if (!this.#machine.is('running')) return;
      this.#machine.to('resident', { fullResidencyMs: Math.round(engine.stats().fullResidencyNs / 1e4) / 100 });
      this.#outageOver();
    });
    this.#watchdog = setInterval(() => this.#checkProgress(), Math.max(10, Math.min(1000, this.#recovery.stallTimeoutMs / 4)));
    this.#watchdog.unref();
  }

  /**
   * An attempt failed: the next attempt goes to the next address (a replica
   * may answer where this one does not), at once within a round over the
   * addresses, after the backoff between rounds. A first connection that
   * cannot be made is final unless it is to be retried; one that failed
   * once the engine held the memory is a pause, unless the source refused.
   */
  #attemptFailed(e: CodedError, first: boolean, failedAt: Address): void {
    const outage = this.#outage;
    if (first && this.#welcomed) {
      // The source answered and proved it serves this image, and the engine holds the caller's memory now: a link
      // that breaks during set-up is an outage like any later one. Only the source's own refusals are final.
      if (REFUSALS_AT_START.has(e.code)) {
        this.#opened.reject(e);
        this.close();
        return;
      }
      this.#pause(e);
      this.#opened.resolve();
      return;
    }
    this.#lastError = e;
    const sources = this.#sources;
    if (sources.length > 1) this.#source = sources[(sources.findIndex((a) => formatAddress(a) === formatAddress(failedAt)) + 1) % sources.length];
    const roundDone = !outage || outage.attempts % sources.length === 0;
    if (first) {
      if (e.code === ErrorCode.UNSUPPORTED || e.code === ErrorCode.IMAGE_CONSUMED) return this.#finalAtStart(e); // asking again would not change the answer
      // A busy source (a flood of connections that never authenticate closed ours to make room) is asked again for a while.
      const busy = e.code === ErrorCode.SOURCE_BUSY && outage !== null && Date.now() - outage.since < this.#recovery.connectTimeoutMs;
      if (this.#options.signal?.aborted || (roundDone && !this.#options.retryFirstConnect && !busy)) return this.#finalAtStart(e);
      if (!roundDone) this.#log.warn({ source: formatAddress(failedAt), code: e.code, reason: e.message }, 'this source cannot be reached; trying the next');
      const retryInMs = this.#scheduleAttempt(roundDone);
      if (roundDone) this.#log.warn({ attempt: outage?.attempts, code: e.code, reason: e.message, retryInMs }, 'the source cannot be reached yet; retrying');
      return;
    }
    this.#machine.to('paused', { code: e.code, attempt: outage?.attempts });
    const retryInMs = this.#scheduleAttempt(roundDone);
    // One line per attempt, whatever it says: which attempt, why, and when the next one goes.
    const level = e.code === ErrorCode.IMAGE_MISMATCH || e.code === ErrorCode.AUTH_FAILED ? 'error' : 'warn';
    this.#log[level](
      { attempt: outage?.attempts, code: e.code, reason: e.message, source: formatAddress(failedAt), next: formatAddress(this.#source), retryInMs },
      `resume attempt ${outage?.attempts ?? ''} failed (${e.code}); retrying in ${retryInMs} ms`,
    );
  }

  /** Schedules the next attempt: at once within a round, else after the backoff (doubled with each failed round, up to the max); returns its delay. */
  #scheduleAttempt(afterRound: boolean): number {
    const outage = this.#outage;
    if (!outage) return 0;
    let delay = 0;
    if (afterRound) {
      const { initial, max } = this.#recovery.retryDelayMs;
      delay = Math.min(max, initial * 2 ** Math.min(outage.failedRounds++, 30));
    }
    outage.retryTimer = setTimeout(() => void this.#attempt(), delay);
    return delay;
  }

  /** The first connection ends in failure: no engine holds any memory, so nothing is lost; open() rejects. */
  #finalAtStart(e: CodedError): void {
    if (!this.#machine.can('failed')) return;
    this.#endOutage();
    this.#lastError = this.#failure = e;
    this.#machine.to('failed', { code: e.code, error: e.message });
    this.#opened.reject(e);
  }

  /** The owner stopped a first connection still being retried (a VMM gone): the wait ends with the last error. */
  #onAbort(): void {
    if (this.#welcomed || !this.#outage?.retryTimer) return; // an attempt under way decides when it ends
    this.#finalAtStart(this.#lastError ?? sessionClosed());
  }

  // ---- running ----

  /** Attaches a link's data channels and starts the source from what we hold. */
  async #begin(link: Link): Promise<void> {
    const connection = link.connection;
    const engine = this.engine;
    const starting = () => {
      if (this.#machine.is('closed')) throw new PostcopyError(ErrorCode.SESSION_CLOSED, 'the session was closed while starting');
      if (!this.#machine.is('connecting', 'resuming')) throw new PostcopyError(ErrorCode.PEER_GONE, `the session became ${this.state} while starting`);
    };
    starting();
    link.generation = engine.attachChannels(connection.takeChannels());
    const have = this.regions.map((r) => ({ region: r.id, bitmap: engine.heldBitmap(r.id) }));
    // The working set goes again on each connection, before `start` (no background run goes ahead of it); the source skips what we hold.
    const replay = this.#options.prefetch && !engine.complete ? this.#options.prefetch.entries : undefined;
    if (replay && !connection.canPrefetch) this.#log.warn('the source cannot stream a working set ahead (no prefetch capability): it is not replayed');
    await connection.start(have.some((h) => h.bitmap.some((b) => b !== 0)) ? have : undefined, replay);
    starting(); // closed, given up, or paused by a channel failing meanwhile
    if (link.earlyFailure) throw link.earlyFailure; // a channel failed before there was a session to pause
    this.#watch(link);
    if (connection.releasesAsSent) this.#reportInstalled(link);
    this.#progress = { lastBytes: engine.stats().bytesReceived, at: Date.now() };
    this.#machine.to(engine.complete ? 'resident' : 'running', { session: connection.session, generation: link.generation });
  }

  /**
   * Release-as-sent: every 25 ms per GiB while this link lasts, tells the
   * source which pages are ours for good (resident, given back, or mapped by
   * no region), in pieces of the held bitmap that changed, so it can free them.
   */
  #reportInstalled(link: Link): void {
    const regions = this.regions;
    const engine = this.engine;
    const told = regions.map((r) => new Uint8Array(Math.ceil(r.length / r.pageSize / 8)));
    const report = () => {
      if (this.#link !== link || this.#machine.is('closed', 'failed')) return clearInterval(timer);
      for (const r of regions) {
        const held = engine.heldBitmap(r.id);
        for (let offset = 0; offset < held.length; offset += 4096) {
          const piece = held.subarray(offset, Math.min(held.length, offset + 4096));
          if (piece.every((b, i) => b === told[r.id][offset + i])) continue;
          link.connection.reportInstalled(r.id, offset, piece);
          told[r.id].set(piece, offset);
        }
      }
      if (engine.complete) clearInterval(timer); // the last report: everything is ours
    };
    // Every 25 ms per GiB held: a source frees memory soon after it is installed, and reading the bitmaps stays cheap.
    const pages = regions.reduce((n, r) => n + r.length / r.pageSize, 0);
    const timer = setInterval(report, 25 * Math.max(1, Math.ceil(pages / 262144)));
    timer.unref();
    link.reportNow = report;
    report();
  }

  /** Lets go of the current link (its channels detached); returns it for the caller to close or abandon. */
  #dropLink(): Link | null {
    const link = this.#link;
    this.#link = null;
    if (link) this.#detach(link);
    return link;
  }

  /** Detaches the data channels `link` brought, unless a later attempt's replaced them. */
  #detach(link: Link): void {
    if (link.generation < 0 || !this.#welcomed) return;
    link.generation = -1; // no event of the old channels matches any more
    this.#welcomed.engine.detachChannels();
  }

  #watch(link: Link): void {
    void link.connection.failure().then((err) => {
      if (this.#link === link) this.#pause(err);
    });
  }

  #onChannelFailed(f: ChannelFailure): void {
    const link = this.#link;
    if (!link || f.generation !== link.generation) return; // from channels already replaced
    if (f.targetGone) return; // the memory's owner exited; it ends the session
    if (this.#machine.is('connecting')) link.earlyFailure = f.error;
    else this.#pause(f.error);
  }

  /** The watchdog: pages are due (requests outstanding, or the background stream unfinished) but no byte came for too long. */
  #checkProgress(): void {
    if (!this.#machine.is('running')) return;
    const engine = this.engine;
    const s = engine.stats();
    const now = Date.now();
    if (s.bytesReceived !== this.#progress.lastBytes) {
      this.#progress = { lastBytes: s.bytesReceived, at: now };
      this.#outageOver();
      return;
    }
    const streaming = this.transfer.background.enabled && !this.#backgroundHeld && !engine.complete;
    if (s.outstandingRequests === 0 && !streaming) {
      this.#progress.at = now; // nothing is due: silence is fine
      this.#outageOver();
      return;
    }
    // A rate-limited stream may rightly pause between runs.
    const rate = this.transfer.background.rateBytesPerSecond;
    const allowed =
      s.outstandingRequests === 0 && rate > 0 ? Math.max(this.#recovery.stallTimeoutMs, (3000 * MAX_RUN_BYTES) / rate) : this.#recovery.stallTimeoutMs;
    if (now - this.#progress.at > allowed) {
      this.#pause(
        new PostcopyError(
          ErrorCode.PEER_SILENT,
          `no page arrived for ${allowed} ms while ${s.outstandingRequests} requested page(s) ${streaming ? 'and the background stream ' : ''}were due`,
        ),
      );
    }
  }

  // ---- pausing and resuming ----

  #pause(err: CodedError): void {
    if (!this.#machine.is('connecting', 'running', 'resident', 'resuming')) return;
    // Before a live source's switchover its workload still runs there: the migration is over, nothing waits for it.
    if (this.#welcomed?.precopy && !this.#switchedOver) {
      const id = this.fingerprint;
      err.message = `the live source ended migration ${id} before its switchover; nothing ran here, so its workload may go on there (if the source had paused it: postcopy serve --live --socket PATH --resume-workload ${id}): ${err.message}`;
      this.fail(err);
      return;
    }
    this.#lastError = err;
    this.#dropLink()?.connection.abandon();
    // An outage lasts until pages flow again: a source that accepts every
    // resume and then delivers nothing is still one outage, and gives up.
    const outage = this.#outage ?? this.#startOutage(false);
    if (outage.retryTimer) clearTimeout(outage.retryTimer);
    const s = this.engine.stats();
    this.#machine.to('paused', {
      code: err.code,
      error: err.message,
      outstandingRequests: s.outstandingRequests,
      residentPages: s.residentPages,
      totalPages: s.totalPages,
    });
    this.emit('paused', err);
    // A pause counts as a failed round: the first attempt waits the first delay.
    this.#scheduleAttempt(true);
  }

  /** An outage begins (the first connection's, or at a pause): its give-up time, when one is set, runs from now. */
  #startOutage(first: boolean, givesUp = true): Outage {
    const outage: Outage = { since: Date.now(), first, attempts: 0, failedRounds: 0, retryTimer: null, giveUpTimer: null, resumedOn: null };
    const giveUp = this.#recovery.giveUpAfterMs;
    if (givesUp && Number.isFinite(giveUp)) {
      outage.giveUpTimer = setTimeout(() => this.#giveUp(outage), giveUp);
      outage.giveUpTimer.unref();
    }
    this.#outage = outage;
    return outage;
  }

  /** Stops the outage's timers; its time counts as paused unless it was the first connection's. */
  #endOutage(): Outage | null {
    const outage = this.#outage;
    if (!outage) return null;
    this.#outage = null;
    if (outage.retryTimer) clearTimeout(outage.retryTimer);
    if (outage.giveUpTimer) clearTimeout(outage.giveUpTimer);
    if (!outage.first) this.#pausedMs += Date.now() - outage.since;
    return outage;
  }

  /**
   * A source serving another image must never supply pages to this one: the
   * same layout, and the same content digest (every byte; the sampled
   * fingerprint only when the source first welcomed us without a digest).
   */
  #checkIdentity(connection: SourceConnection): void {
    const want = this.#welcomed!;
    const sameLayout =
      connection.regions.length === want.regions.length &&
      connection.regions.every((r, i) => r.length === want.regions[i].length && r.pageSize === want.regions[i].pageSize);
    const short = (digest: string | undefined) => (digest ? digest.slice(0, 16) : 'none');
    const why = !sameLayout
      ? 'size or regions differ'
      : want.content !== undefined
        ? connection.content !== want.content && `content digest ${short(connection.content)}, not ${short(want.content)} as first welcomed`
        : connection.fingerprint !== want.fingerprint && 'content differs';
    if (why) throw new PostcopyError(ErrorCode.IMAGE_MISMATCH, `the source at ${formatAddress(this.#source)} serves a different image (${why}); refused`);
  }

  /** Pages flow again (or nothing is due): the outage that began at the first pause is over. */
  #outageOver(): void {
    if (!this.#outage || this.#outage.first) return;
    const outage = this.#endOutage()!;
    const outageMs = Date.now() - outage.since;
    this.#resumes++;
    const s = this.engine.stats();
    const connection = outage.resumedOn;
    // Said at the level the pause was: whoever saw the pause sees it end.
    this.#log.warn(
      {
        outageMs,
        attempts: outage.attempts,
        sameSession: connection?.resumed,
        session: connection?.session,
        requestsResent: s.requestsResent,
        residentPages: s.residentPages,
      },
      `resumed after ${(outageMs / 1000).toFixed(1)} s`,
    );
    this.emit('resumed', { outageMs, attempts: outage.attempts });
  }

  #giveUp(outage: Outage): void {
    outage.giveUpTimer = null;
    if (this.#outage !== outage || this.#machine.is('failed', 'closed', 'verified')) return;
    const last = this.#lastError;
    const lastWords = last ? ` (last: ${last.code}: ${last.message})` : '';
    if (!this.#welcomed) {
      this.#finalAtStart(
        new PostcopyError(
          ErrorCode.SOURCE_LOST,
          `the source could not be reached for ${this.#recovery.giveUpAfterMs} ms${lastWords}`,
          last ? { cause: last.code } : undefined,
        ),
      );
      return;
    }
    // Past a live source's switchover the workload ran here and waits paused at the source: say that this copy is
    // given up, so the one there may run again (and how), since no source heard it.
    const live = this.#welcomed.precopy && this.#switchedOver;
    const id = this.fingerprint;
    this.fail(
      new PostcopyError(
        ErrorCode.SOURCE_LOST,
        `the source stayed out of reach for ${this.#recovery.giveUpAfterMs} ms${lastWords}${
          live
            ? `; this destination gives up live migration ${id} and its copy of the workload never runs again: the workload paused at the source may resume there (postcopy serve --live --socket PATH --resume-workload ${id})`
            : ''
        }`,
        last ? { cause: last.code } : undefined,
      ),
    );
  }
}

/**
 * Resolves once `session` (its 'state' events) is in one of `states`;
 * rejects with `failure()` once it is failed or closed first.
 */
export function whenState(session: EventEmitter & { readonly state: string }, states: readonly string[], failure: () => CodedError): Promise<void> {
  return new Promise((resolve, reject) => {
    const check = (): boolean => {
      if (states.includes(session.state)) resolve();
      else if (session.state === 'failed' || session.state === 'closed') reject(failure());
      else return false;
      return true;
    };
    if (check()) return;
    const listener = () => {
      if (check()) session.off('state', listener);
    };
    session.on('state', listener);
  });
}

/** What a wait on a session its owner closed rejects with; `last`: what had gone wrong before, if anything. */
export function sessionClosed(last?: CodedError | null): PostcopyError {
  return new PostcopyError(ErrorCode.SESSION_CLOSED, `the session was closed by its owner${last ? ` (last error: ${last.code}: ${last.message})` : ''}`);
}

/** The source first, then its replicas. */
export function sourcesOf(options: DestinationSessionOptions): Address[] {
  const parse = (a: string | Address) => (typeof a === 'string' ? parseAddress(a) : a);
  return [parse(options.source), ...(options.replicas ?? []).map(parse)];
}

function resolveRecovery(r: RecoveryOptions = {}): Resolved {
  return {
    heartbeat: r.heartbeat ?? DEFAULT_HEARTBEAT,
    stallTimeoutMs: r.stallTimeoutMs ?? 5000,
    digestTimeoutMs: r.digestTimeoutMs ?? 60_000,
    connectTimeoutMs: r.connectTimeoutMs ?? 10_000,
    retryDelayMs: r.retryDelayMs ?? { initial: 100, max: 5000 },
    giveUpAfterMs: r.giveUpAfterMs ?? Infinity,
  };
}
