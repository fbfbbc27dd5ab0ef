// One destination session: a fault engine over memory (ours, or a VMM's) fed
// by a source, with its states named once and changed only through the table
// below. A restore (Destination) and each VMM of the handler (VmmHandler) are
// thin users of it.
//
// When anything breaks (a data channel ends or errs, the control channel goes
// quiet, pages stop arriving while they are due, the digest does not come) the
// session pauses: the engine keeps the userfaultfd, the received bitmap and
// the unanswered requests, and faulting threads simply wait. It then
// reconnects by itself with backoff, proves the token again, presents its
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
 * connecting: first handshake; running: pages flow; paused: the source is out
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

/**
 * Events: 'paused' (CodedError), 'resumed' ({outageMs, attempts}),
 * 'failed' (CodedError): given up, and 'state' (to, from).
 */
export class DestinationSession extends EventEmitter implements PageSession {
  readonly engine: FaultEngine;
  readonly transfer: TransferOptions;
  readonly #machine: StateMachine<DestinationState>;
  readonly #log: Logger;
  readonly #options: DestinationSessionOptions;
  readonly #recovery: Resolved;
  readonly #identity: { regions: RegionInfo[]; fingerprint: string; content: string | undefined };
  #source: Address;
  /** The source and its replicas, tried in turn while out of reach. */
  readonly #sources: Address[];
  #sessionId: string;
  #connection: SourceConnection | null;
  #generation: number;
  #resumes = 0;
  #attempts = 0;
  #outageSince = 0;
  #pausedMs = 0;
  #lastError: CodedError | null = null;
  /** Why the session failed (fail()): what every wait rejects with after. */
  #failure: CodedError | null = null;
  #retryTimer: NodeJS.Timeout | null = null;
  #giveUpTimer: NodeJS.Timeout | null = null;
  #watchdog: NodeJS.Timeout;
  #lastBytes = 0;
  #channelsOf: SourceConnection | null = null; // whose data channels the engine holds
  #earlyFailure: CodedError | null = null; // a channel failed while the first connection was starting
  #resumedOn: SourceConnection | null = null;
  #lastProgressAt = Date.now();
  /** Release-as-sent: reports the pages held to the source now. */
  #reportNow: (() => void) | null = null;
  /** The background stream is held back (holdBackground) until startBackground(). */
  #backgroundHeld: boolean;
  /** A live source sends precopy rounds; the workload runs here once its switchover marker came. */
  readonly #precopy: boolean;
  #switchedOver = false;

  private constructor(
    options: DestinationSessionOptions,
    recovery: Resolved,
    machine: StateMachine<DestinationState>,
    connection: SourceConnection,
    engine: FaultEngine,
    log: Logger,
  ) {
    super();
    this.#options = options;
    this.#recovery = recovery;
    this.#machine = machine;
    this.#log = log;
    this.#sources = sourcesOf(options);
    // The first connection may have been made to a replica.
    this.#source = this.#sources.find((a) => formatAddress(a) === connection.address) ?? this.#sources[0];
    this.transfer = transferOptions(options);
    this.#connection = connection;
    this.#sessionId = connection.session;
    this.#identity = { regions: connection.regions, fingerprint: connection.fingerprint, content: connection.content };
    this.engine = engine;
    this.#generation = 0;
    this.#backgroundHeld = connection.backgroundHeld;
    machine.onChange((to, from) => this.emit('state', to, from));
    engine.on('channel-failed', (f: ChannelFailure) => this.#onChannelFailed(f));
    this.#precopy = connection.live && options.precopy === true;
    engine.on('switchover', (e: { discarded: number; rewritten: number }) => {
      this.#switchedOver = true;
      this.#connection?.reportRunning();
      this.#log.info({ ...e, precopiedPages: engine.stats().pagesPrecopied }, 'the live source switched over: the workload runs here now');
      this.emit('running');
    });
    engine.on('complete', () => {
      this.#reportNow?.(); // release-as-sent: the last pages are ours before anyone says done
      if (!this.#machine.is('running')) return;
      this.#machine.to('resident', { fullResidencyMs: Math.round(this.engine.stats().fullResidencyNs / 1e4) / 100 });
      this.#outageOver();
    });
    this.#watchdog = setInterval(() => this.#checkProgress(), Math.max(10, Math.min(1000, recovery.stallTimeoutMs / 4)));
    this.#watchdog.unref();
  }

  /**
   * Connects to the source, has `buildEngine` make the engine over the
   * caller's memory for the source's regions, and starts the transfer.
   * A first connection that cannot be made is an error (nothing to lose
   * yet), unless retryFirstConnect: then it is retried. Once the source has
   * answered and the engine holds the caller's memory, a broken link is a
   * pause (the session is returned paused), unless the source refused.
   */
  static async open(options: DestinationSessionOptions, buildEngine: EngineFactory): Promise<DestinationSession> {
    const log = options.logger ?? silentLogger;
    const recovery = resolveRecovery(options.recovery);
    const machine = new StateMachine<DestinationState>('destination', 'connecting', TRANSITIONS, log);
    const transfer = transferOptions(options);
    let connection: SourceConnection;
    try {
      connection = await connectFirst(options, recovery, transfer, log);
    } catch (err) {
      machine.to('failed', { code: (err as PostcopyError).code, error: (err as Error).message });
      throw err;
    }
    let engine: FaultEngine;
    try {
      if (options.prefetch) checkReplay(options.prefetch, connection.regions, connection.fingerprint, log);
      engine = buildEngine(connection.regions, undefined, connection.live && options.precopy === true);
    } catch (err) {
      connection.close();
      machine.to('failed', { code: (err as PostcopyError).code, error: (err as Error).message });
      throw err;
    }
    const session = new DestinationSession(options, recovery, machine, connection, engine, log);
    try {
      await session.#begin(connection);
    } catch (err) {
      // The source answered and proved it serves this image, and the engine holds the caller's memory now: a link
      // that breaks during set-up is an outage like any later one (a pause, then a resume or the give-up time).
      // Only the source's own refusals are final.
      if (machine.is('connecting') && !REFUSALS_AT_START.has(asCodedError(err).code)) {
        session.#pause(asCodedError(err));
        return session;
      }
      session.close();
      throw err;
    }
    log.info(
      { session: connection.session, regions: connection.regions.length, bytes: connection.regions.reduce((n, r) => n + r.length, 0), ...transfer },
      'transfer started',
    );
    return session;
  }

  get state(): DestinationState {
    return this.#machine.state;
  }

  get fingerprint(): string {
    return this.#identity.fingerprint;
  }

  /** The source's regions, as first welcomed. */
  get regions(): RegionInfo[] {
    return this.#identity.regions;
  }

  status(): RecoveryStatus {
    return {
      state: this.state,
      session: this.#sessionId,
      source: formatAddress(this.#source),
      resumes: this.#resumes,
      pausedMs: this.#pausedMs + (this.#outageSince ? Date.now() - this.#outageSince : 0),
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
    this.#connection?.startBackground();
    this.#log.info('background stream started');
  }

  /** Points later reconnection attempts at another address (e.g. the source moved); takes effect at the next attempt. */
  redirect(source: string | Address): void {
    this.#source = typeof source === 'string' ? parseAddress(source) : source;
    this.#log.warn({ source: formatAddress(this.#source) }, 'the source is now reached at a new address');
  }

  /** Resolves once every page is resident; rejects when the session fails or closes first. */
  whenResident(): Promise<void> {
    return this.#until(['resident', 'verified']);
  }

  whenRunning(): Promise<void> {
    if (!this.#precopy || this.#switchedOver) return Promise.resolve();
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
      const connection = this.#connection;
      if (!connection) throw new PostcopyError(ErrorCode.SESSION_CLOSED, 'the source connection was already released by this session');
      try {
        const digest = await connection.finish(stats, this.#recovery.digestTimeoutMs, verify);
        // The connection may have failed in the same breath (the digest and an error in one read): ask again then.
        if (this.#connection === connection && this.#machine.is('resident')) {
          this.#outageOver(); // the digest came: the outage (if any) is over
          return digest;
        }
      } catch (err) {
        if (this.#connection === connection) this.#pause(asCodedError(err));
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
    const connection = this.#connection;
    this.#connection = null;
    this.#detachChannelsOf(this.#channelsOf);
    connection?.close();
  }

  /** Ends the session in failure (e.g. the digest did not match). */
  fail(err: CodedError): void {
    if (!this.#machine.can('failed')) return;
    this.#stopRecovery();
    this.#lastError = this.#failure = err;
    this.#connection?.abandon();
    this.#connection = null;
    this.#detachChannelsOf(this.#channelsOf);
    this.#machine.to('failed', { code: err.code, error: err.message });
    this.emit('failed', err);
  }

  /** Stops the engine and drops the connection. The memory and its userfaultfd stay the caller's. */
  close(): void {
    if (this.#machine.is('closed')) return;
    this.#stopRecovery();
    clearInterval(this.#watchdog);
    this.#connection?.close();
    this.#connection = null;
    this.engine.stop();
    const { state: _, ...status } = this.status(); // `state` in the details would hide the state logged
    this.#machine.to('closed', status);
  }

  // ---- running ----

  /** Attaches a connection's data channels and starts the source from what we hold. */
  async #begin(connection: SourceConnection): Promise<void> {
    const starting = () => {
      if (this.#machine.is('closed')) throw new PostcopyError(ErrorCode.SESSION_CLOSED, 'the session was closed while starting');
      if (!this.#machine.is('connecting', 'resuming')) throw new PostcopyError(ErrorCode.PEER_GONE, `the session became ${this.state} while starting`);
    };
    starting();
    this.#earlyFailure = null;
    this.#generation = this.engine.attachChannels(connection.takeChannels());
    this.#channelsOf = connection;
    const have = this.#identity.regions.map((r) => ({ region: r.id, bitmap: this.engine.heldBitmap(r.id) }));
    // The working set goes again on each connection, before `start` (no background run goes ahead of it); the source skips what we hold.
    const replay = this.#options.prefetch && !this.engine.complete ? this.#options.prefetch.entries : undefined;
    if (replay && !connection.canPrefetch) this.#log.warn('the source cannot stream a working set ahead (no prefetch capability): it is not replayed');
    await connection.start(have.some((h) => h.bitmap.some((b) => b !== 0)) ? have : undefined, replay);
    starting(); // closed, given up, or paused by a channel failing meanwhile
    if (this.#earlyFailure) throw this.#earlyFailure; // a channel failed before there was a session to pause
    this.#watch(connection);
    if (connection.releasesAsSent) this.#reportInstalled(connection);
    this.#lastProgressAt = Date.now();
    this.#lastBytes = this.engine.stats().bytesReceived;
    this.#machine.to(this.engine.complete ? 'resident' : 'running', { session: connection.session, generation: this.#generation });
  }

  /**
   * Release-as-sent: every 25 ms per GiB while this connection lasts, tells the
   * source which pages are ours for good (resident, given back, or mapped by
   * no region), in pieces of the held bitmap that changed, so it can free them.
   */
  #reportInstalled(connection: SourceConnection): void {
    const told = this.#identity.regions.map((r) => new Uint8Array(Math.ceil(r.length / r.pageSize / 8)));
    const report = () => {
      if (this.#connection !== connection || this.#machine.is('closed', 'failed')) return clearInterval(timer);
      for (const r of this.#identity.regions) {
        const held = this.engine.heldBitmap(r.id);
        for (let offset = 0; offset < held.length; offset += 4096) {
          const piece = held.subarray(offset, Math.min(held.length, offset + 4096));
          if (piece.every((b, i) => b === told[r.id][offset + i])) continue;
          connection.reportInstalled(r.id, offset, piece);
          told[r.id].set(piece, offset);
        }
      }
      if (this.engine.complete) clearInterval(timer); // the last report: everything is ours
    };
    // Every 25 ms per GiB held: a source frees memory soon after it is installed, and reading the bitmaps stays cheap.
    const pages = this.#identity.regions.reduce((n, r) => n + r.length / r.pageSize, 0);
    const timer = setInterval(report, 25 * Math.max(1, Math.ceil(pages / 262144)));
    timer.unref();
    this.#reportNow = report;
    report();
  }

  /** Detaches the data channels `connection` brought, unless a later attempt's replaced them. */
  #detachChannelsOf(connection: SourceConnection | null): void {
    if (connection === null || this.#channelsOf !== connection) return;
    this.engine.detachChannels();
    this.#generation = -1; // no event of the old channels matches any more
    this.#channelsOf = null;
  }

  #watch(connection: SourceConnection): void {
    void connection.failure().then((err) => {
      if (this.#connection === connection) this.#pause(err);
    });
  }

  #onChannelFailed(f: ChannelFailure): void {
    if (f.generation !== this.#generation) return; // from channels already replaced
    if (f.targetGone) return; // the memory's owner exited; it ends the session
    if (this.#machine.is('connecting')) this.#earlyFailure = f.error;
    else this.#pause(f.error);
  }

  /** The watchdog: pages are due (requests outstanding, or the background stream unfinished) but no byte came for too long. */
  #checkProgress(): void {
    if (!this.#machine.is('running')) return;
    const s = this.engine.stats();
    const now = Date.now();
    if (s.bytesReceived !== this.#lastBytes) {
      this.#lastBytes = s.bytesReceived;
      this.#lastProgressAt = now;
      this.#outageOver();
      return;
    }
    const streaming = this.transfer.background.enabled && !this.#backgroundHeld && !this.engine.complete;
    if (s.outstandingRequests === 0 && !streaming) {
      this.#lastProgressAt = now; // nothing is due: silence is fine
      this.#outageOver();
      return;
    }
    // A rate-limited stream may rightly pause between runs.
    const rate = this.transfer.background.rateBytesPerSecond;
    const allowed =
      s.outstandingRequests === 0 && rate > 0 ? Math.max(this.#recovery.stallTimeoutMs, (3000 * MAX_RUN_BYTES) / rate) : this.#recovery.stallTimeoutMs;
    if (now - this.#lastProgressAt > allowed) {
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
    if (this.#precopy && !this.#switchedOver) {
      const id = this.#identity.fingerprint;
      err.message = `the live source ended migration ${id} before its switchover; nothing ran here, so its workload may go on there (if the source had paused it: postcopy serve --live --socket PATH --resume-workload ${id}): ${err.message}`;
      this.fail(err);
      return;
    }
    this.#lastError = err;
    const connection = this.#connection;
    this.#connection = null;
    connection?.abandon();
    this.#detachChannelsOf(this.#channelsOf);
    // An outage lasts until pages flow again: a source that accepts every
    // resume and then delivers nothing is still one outage, and gives up.
    if (!this.#outageSince) {
      this.#outageSince = Date.now();
      this.#attempts = 0;
      const giveUp = this.#recovery.giveUpAfterMs;
      if (Number.isFinite(giveUp)) {
        this.#giveUpTimer = setTimeout(() => this.#giveUp(), giveUp);
        this.#giveUpTimer.unref();
      }
    }
    const s = this.engine.stats();
    this.#machine.to('paused', {
      code: err.code,
      error: err.message,
      outstandingRequests: s.outstandingRequests,
      residentPages: s.residentPages,
      totalPages: s.totalPages,
    });
    this.emit('paused', err);
    this.#scheduleResume();
  }

  #scheduleResume(): void {
    const { initial, max } = this.#recovery.retryDelayMs;
    const delay = Math.min(max, initial * 2 ** Math.min(this.#attempts, 30));
    this.#retryTimer = setTimeout(() => void this.#resume(), delay);
  }

  async #resume(): Promise<void> {
    this.#retryTimer = null;
    if (!this.#machine.is('paused')) return;
    this.#attempts++;
    this.#machine.to('resuming', { attempt: this.#attempts, source: formatAddress(this.#source) });
    let connection: SourceConnection | null = null;
    try {
      connection = await SourceConnection.open({
        source: this.#source,
        token: this.#options.token,
        transfer: this.transfer,
        holdBackground: this.#backgroundHeld,
        ...(this.#options.pageSizesFor ? { pageSizesFor: this.#options.pageSizesFor } : {}),
        resume: this.#sessionId,
        maxImageBytes: this.#options.maxImageBytes,
        acceptPlaintextTcp: this.#options.acceptPlaintextTcp,
        timeoutMs: this.#recovery.connectTimeoutMs,
        heartbeat: this.#recovery.heartbeat,
      });
      if (!this.#machine.is('resuming')) {
        connection.close(); // closed or given up meanwhile
        return;
      }
      this.#checkIdentity(connection);
      this.#connection = connection;
      this.#sessionId = connection.session;
      this.#resumedOn = connection;
      // Back in "resident" is no progress: the outage lasts until the digest comes (exchangeDigest), or the give-up time.
      await this.#begin(connection);
    } catch (err) {
      const e = asCodedError(err);
      if (this.#connection === connection) this.#connection = null;
      connection?.abandon();
      this.#detachChannelsOf(connection); // whatever this attempt attached, unless replaced since
      if (!this.#machine.is('resuming')) return; // closed, given up, or already paused again
      this.#lastError = e;
      const level = e.code === ErrorCode.IMAGE_MISMATCH || e.code === ErrorCode.AUTH_FAILED ? 'error' : 'warn';
      const failedAt = this.#source;
      if (this.#sources.length > 1) {
        // The next attempt goes to the next address: a replica may answer where this one does not.
        this.#source = this.#sources[(this.#sources.findIndex((a) => formatAddress(a) === formatAddress(failedAt)) + 1) % this.#sources.length];
      }
      this.#log[level](
        { attempt: this.#attempts, code: e.code, err: e.message, source: formatAddress(failedAt), next: formatAddress(this.#source) },
        'resume attempt failed; retrying',
      );
      this.#machine.to('paused', { code: e.code, attempt: this.#attempts });
      this.#scheduleResume();
    }
  }

  /**
   * A source serving another image must never supply pages to this one: the
   * same layout, and the same content digest (every byte; the sampled
   * fingerprint only when the source first welcomed us without a digest).
   */
  #checkIdentity(connection: SourceConnection): void {
    const want = this.#identity;
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
    if (!this.#outageSince) return;
    const outageMs = Date.now() - this.#outageSince;
    this.#pausedMs += outageMs;
    this.#outageSince = 0;
    this.#resumes++;
    if (this.#giveUpTimer) clearTimeout(this.#giveUpTimer);
    this.#giveUpTimer = null;
    const s = this.engine.stats();
    const connection = this.#resumedOn;
    this.#log.info(
      {
        outageMs,
        attempts: this.#attempts,
        sameSession: connection?.resumed,
        session: connection?.session,
        requestsResent: s.requestsResent,
        residentPages: s.residentPages,
      },
      'resumed',
    );
    this.emit('resumed', { outageMs, attempts: this.#attempts });
  }

  #giveUp(): void {
    this.#giveUpTimer = null;
    if (!this.#outageSince || this.#machine.is('failed', 'closed', 'verified')) return;
    const last = this.#lastError;
    // Past a live source's switchover the workload ran here and waits paused at the source: say that this copy is
    // given up, so the one there may run again (and how), since no source heard it.
    const live = this.#precopy && this.#switchedOver;
    this.fail(
      new PostcopyError(
        ErrorCode.SOURCE_LOST,
        `the source stayed out of reach for ${this.#recovery.giveUpAfterMs} ms${last ? ` (last: ${last.code}: ${last.message})` : ''}${
          live
            ? `; this destination gives up live migration ${this.#identity.fingerprint} and its copy of the workload never runs again: the workload paused at the source may resume there (postcopy serve --live --socket PATH --resume-workload ${this.#identity.fingerprint})`
            : ''
        }`,
        last ? { cause: last.code } : undefined,
      ),
    );
  }

  #stopRecovery(): void {
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    if (this.#giveUpTimer) clearTimeout(this.#giveUpTimer);
    this.#retryTimer = this.#giveUpTimer = null;
    if (this.#outageSince) this.#pausedMs += Date.now() - this.#outageSince;
    this.#outageSince = 0;
  }

  /** Resolves when the session is in one of `states`; rejects once it fails or closes. */
  #until(states: DestinationState[]): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        if (states.includes(this.state)) resolve();
        else if (this.#machine.is('failed', 'closed')) reject(this.#failure ?? sessionClosed(this.#lastError));
        else return false;
        return true;
      };
      if (check()) return;
      const listener = () => {
        if (check()) this.off('state', listener);
      };
      this.on('state', listener);
    });
  }
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

/**
 * The first connection: the source, else each replica in turn; with
 * retryFirstConnect, round after round until the give-up time.
 */
async function connectFirst(options: DestinationSessionOptions, recovery: Resolved, transfer: TransferOptions, log: Logger): Promise<SourceConnection> {
  const started = Date.now();
  const sources = sourcesOf(options);
  for (let attempt = 1; ; attempt++) {
    const source = sources[(attempt - 1) % sources.length];
    try {
      return await SourceConnection.open({
        source,
        token: options.token,
        transfer,
        holdBackground: options.holdBackground === true,
        ...(options.pageSizesFor ? { pageSizesFor: options.pageSizesFor } : {}),
        ...(options.precopy ? { precopy: true } : {}),
        timeoutMs: recovery.connectTimeoutMs,
        heartbeat: recovery.heartbeat,
        maxImageBytes: options.maxImageBytes,
        acceptPlaintextTcp: options.acceptPlaintextTcp,
      });
    } catch (err) {
      const e = asCodedError(err);
      const roundDone = attempt % sources.length === 0;
      if (e.code === ErrorCode.UNSUPPORTED || e.code === ErrorCode.IMAGE_CONSUMED) throw e; // asking again would not change the answer
      // A busy source (a flood of connections that never authenticate closed ours to make room) is asked again for a while.
      const busy = e.code === ErrorCode.SOURCE_BUSY && Date.now() - started < recovery.connectTimeoutMs;
      if (options.signal?.aborted || (roundDone && !options.retryFirstConnect && !busy)) throw e;
      if (!roundDone) {
        log.warn({ source: formatAddress(source), code: e.code, err: e.message }, 'this source cannot be reached; trying the next');
        continue;
      }
      const waited = Date.now() - started;
      if (waited >= recovery.giveUpAfterMs)
        throw new PostcopyError(ErrorCode.SOURCE_LOST, `the source could not be reached for ${recovery.giveUpAfterMs} ms (last: ${e.code}: ${e.message})`, {
          cause: e.code,
        });
      const rounds = attempt / sources.length;
      const delay = Math.min(recovery.retryDelayMs.max, recovery.retryDelayMs.initial * 2 ** Math.min(rounds - 1, 30), recovery.giveUpAfterMs - waited);
      log.warn({ attempt, code: e.code, err: e.message, retryInMs: delay }, 'the source cannot be reached yet; retrying');
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, delay);
        options.signal?.addEventListener(
          'abort',
          () => {
            clearTimeout(timer);
            resolve();
          },
          { once: true },
        );
      });
      if (options.signal?.aborted) throw e;
    }
  }
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
