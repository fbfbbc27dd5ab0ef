// A live source: the memory of a running workload (a VMM), moved while it
// runs. The workload hands its memory over the way it would hand it to a
// destination's handler (docs/VMM-HANDSHAKE.md, "Live sources"): its regions,
// its userfaultfd and its memory file. This source reads the memory from that
// file without stopping it, registers the regions for asynchronous
// write-protection (UFFD_FEATURE_WP_ASYNC: the kernel resolves the write
// itself and marks the page written) and finds the written pages with the
// PAGEMAP_SCAN ioctl on /proc/PID/pagemap, which write-protects them again in
// the same call.
//
// LiveMigration drives one destination session through precopy rounds
// (everything, then what was written since), the switchover (the workload
// pauses; the pages written since they were sent are discarded at the
// destination, which runs from then on) and postcopy (the rest on request and
// in the background, from the paused memory).
import { EventEmitter, once } from 'node:events';
import { closeSync, fstatSync, openSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { ErrorCode, PostcopyError, asCodedError, type CodedError } from '../lib/errors.js';
import { receiveFds, peerCredentials, socketFd } from '../lib/fd-passing.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { native, type NativeEvent } from '../lib/native.js';
import { listenOwnerOnly } from '../lib/unix-socket.js';
import { isUserfaultfd, parseHandshake, type GuestRegion } from '../lib/vmm-handshake.js';
import { StateMachine, type TransitionTable } from '../lib/state-machine.js';
import { Image } from '../lib/image.js';

const PAGE = 4096;
const REGISTER_MODE_WP = 2n;
const WRITEPROTECT_MODE_WP = 1;

/** The running workload whose memory this source serves. Events: 'gone' (CodedError): it exited or hung up. */
export class LiveWorkload extends EventEmitter {
  readonly pid: number;
  readonly regions: GuestRegion[];
  /** Its memory file, read as it changes (lib/image.ts, live). */
  readonly image: Image;
  readonly #socket: Socket;
  readonly #uffd: number;
  readonly #memfd: number;
  #pausedFor: string | null;
  #pagemap = -1;
  #lines = '';
  #gone: CodedError | null = null;

  private constructor(socket: Socket, pid: number, regions: GuestRegion[], uffd: number, memfd: number, pausedFor: string | null) {
    super();
    this.#socket = socket;
    this.pid = pid;
    this.regions = regions;
    this.#uffd = uffd;
    this.#memfd = memfd;
    this.#pausedFor = pausedFor;
    // Its image is named as its migration: a destination that resumes from a restarted source finds the same one.
    this.image = Image.open([{ fd: memfd, name: `workload-${pid}` }], { live: true, ...(pausedFor ? { migration: pausedFor } : {}) });
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.#lines += d;
      for (let nl = this.#lines.indexOf('\n'); nl >= 0; nl = this.#lines.indexOf('\n')) {
        const line = this.#lines.slice(0, nl);
        this.#lines = this.#lines.slice(nl + 1);
        let msg: { t?: string } = {};
        try {
          msg = JSON.parse(line) as { t?: string };
        } catch {
          /* not a message: ignored */
        }
        if (typeof msg.t === 'string') this.emit(`workload:${msg.t}`);
      }
    });
    socket.on('error', () => {});
    socket.once('close', () => {
      this.#gone = new PostcopyError(ErrorCode.WORKLOAD_GONE, `the workload (pid ${pid}) hung up`);
      this.emit('gone', this.#gone);
    });
  }

  /**
   * Waits on `path` (created 0600) for the workload to connect and hand its
   * memory over, then stops listening. Refused with a clear error: a handshake
   * that is not JSON regions with a userfaultfd and the memory file, or
   * regions that do not lie in that file at their own offset.
   */
  static async accept(path: string, options: { handshakeTimeoutMs?: number; logger?: Logger } = {}): Promise<LiveWorkload> {
    const log = options.logger ?? silentLogger;
    const server: Server = createServer({ pauseOnConnect: true });
    await listenOwnerOnly(server, path);
    log.info({ socket: path }, 'waiting for the workload to hand its memory over');
    try {
      const [socket] = (await once(server, 'connection')) as [Socket];
      const fd = socketFd(socket);
      const pid = peerCredentials(fd).pid;
      const msg = await receiveFds(fd, { maxBytes: 64 << 10, maxFds: 2, timeoutMs: options.handshakeTimeoutMs ?? 10_000 });
      try {
        if (msg.fds.length !== 2 || !isUserfaultfd(msg.fds[0]) || !fstatSync(msg.fds[1]).isFile())
          throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'a live workload sends its userfaultfd, then its memory file (a memfd), with its regions');
        const { regions, pausedFor } = parseLiveHandshake(msg.payload);
        const size = fstatSync(msg.fds[1]).size;
        for (const [i, r] of regions.entries()) {
          if ((r.memfd_offset ?? r.offset) !== r.offset || r.offset % PAGE || r.size % PAGE || r.base_host_virt_addr % PAGE || r.offset + r.size > size)
            throw new PostcopyError(
              ErrorCode.PROTOCOL_OUT_OF_RANGE,
              `region ${i}: a live workload's region lies in its memory file at its own offset, in whole pages (file: ${size} bytes)`,
            );
        }
        const workload = new LiveWorkload(socket, pid, regions, msg.fds[0], msg.fds[1], pausedFor);
        socket.resume();
        if (pausedFor)
          log.warn({ pid, migration: pausedFor, bytes: size }, 'the workload handed its memory over again, paused for a migration past its switchover');
        else log.info({ pid, regions: regions.length, bytes: size }, 'the workload handed its memory over');
        return workload;
      } catch (err) {
        for (const f of msg.fds) closeSync(f);
        socket.destroy();
        throw err;
      }
    } finally {
      server.close();
    }
  }

  get gone(): boolean {
    return this.#gone !== null;
  }

  /**
   * The migration this workload is paused for, past its switchover (it came
   * back to a restarted source, saying so), or null: it runs, or it was
   * paused by this process.
   */
  get pausedFor(): string | null {
    return this.#pausedFor;
  }

  /** Every page write-protected: from now on each page the workload writes shows up in written(). */
  startTracking(): void {
    this.#pagemap = openSync(`/proc/${this.pid}/pagemap`, 'r');
    for (const r of this.regions) {
      try {
        native.uffdRegister(this.#uffd, r.base_host_virt_addr, r.size, Number(REGISTER_MODE_WP));
      } catch (err) {
        throw Object.assign(
          new PostcopyError(
            ErrorCode.UNSUPPORTED,
            `the workload's userfaultfd cannot track writes (it must be opened with UFFD_FEATURE_WP_ASYNC, WP_UNPOPULATED and WP_HUGETLBFS_SHMEM): ${(err as Error).message}`,
          ),
          { errno: (err as NodeJS.ErrnoException).errno, syscall: 'ioctl' },
        );
      }
      native.uffdWriteProtect(this.#uffd, r.base_host_virt_addr, r.size, WRITEPROTECT_MODE_WP);
    }
  }

  /** The pages written since the last call (or startTracking), as image ranges; each is write-protected again. */
  written(): Ranges {
    const out = new Ranges();
    for (const r of this.regions) {
      const found = native.pagemapScanWritten(this.#pagemap, r.base_host_virt_addr, r.base_host_virt_addr + r.size);
      for (let i = 0; i < found.length; i += 16) {
        const start = Number(found.readBigUInt64LE(i)),
          end = Number(found.readBigUInt64LE(i + 8));
        out.add((start - r.base_host_virt_addr + r.offset) / PAGE, (end - start) / PAGE);
      }
    }
    return out;
  }

  /** Every page of the image, as ranges. */
  everything(): Ranges {
    const out = new Ranges();
    out.add(0, this.image.regions[0].length / PAGE);
    return out;
  }

  /**
   * Asks the workload to pause and waits (up to `timeoutMs`) until it says it
   * has. The pause names the migration: from now on the workload runs again
   * only when told `resume`, never because this source went away.
   */
  async pause(timeoutMs = 10_000): Promise<void> {
    await this.#ask({ t: 'pause', migration: this.image.fingerprint }, 'paused', timeoutMs);
  }

  /** The workload goes on here: the migration was abandoned before the switchover, or its destination gave up. */
  resume(): void {
    this.#pausedFor = null;
    this.#say('resume');
  }

  /** The destination holds every page: the workload may exit. */
  migrated(): void {
    this.#say('migrated');
  }

  #say(t: string | { t: string; [field: string]: unknown }): void {
    if (!this.#gone) this.#socket.write(JSON.stringify(typeof t === 'string' ? { t } : t) + '\n');
  }

  async #ask(message: { t: string; [field: string]: unknown }, answer: string, timeoutMs: number): Promise<void> {
    const t = message.t;
    if (this.#gone) throw this.#gone;
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), timeoutMs);
    try {
      this.#say(message);
      await Promise.race([
        once(this, `workload:${answer}`, { signal: ac.signal }),
        once(this, 'gone', { signal: ac.signal }).then(() => {
          throw this.#gone;
        }),
      ]);
    } catch (err) {
      if (ac.signal.aborted && !this.#gone) throw new PostcopyError(ErrorCode.TIMEOUT, `the workload did not answer "${t}" within ${timeoutMs} ms`);
      throw err;
    } finally {
      clearTimeout(timer);
      ac.abort();
    }
  }

  /** Lets go of everything it handed over (its memory stays readable to a session still serving it until the image is closed). */
  close(): void {
    this.#socket.destroy();
    if (this.#pagemap >= 0) closeSync(this.#pagemap);
    this.#pagemap = -1;
    closeSync(this.#uffd);
    this.image.close();
    closeSync(this.#memfd);
  }
}

/** A migration's name, as a live image's fingerprint (lib/image.ts). */
const MIGRATION_ID = /^live-[0-9a-f]{32}$/;

/**
 * A live workload's handshake: its region array, or, from a workload paused
 * for a migration past its switchover, {"paused": ID, "regions": [...]}
 * (docs/VMM-HANDSHAKE.md, "When the source goes away").
 */
function parseLiveHandshake(payload: Buffer): { regions: GuestRegion[]; pausedFor: string | null } {
  let parsed: unknown;
  try {
    parsed = JSON.parse(payload.toString('utf8'));
  } catch {
    throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the handshake is not JSON');
  }
  if (Array.isArray(parsed)) return { regions: parseHandshake(payload), pausedFor: null };
  const { paused, regions } = (parsed ?? {}) as { paused?: unknown; regions?: unknown };
  if (typeof paused !== 'string' || !MIGRATION_ID.test(paused) || !Array.isArray(regions))
    throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'a paused workload hands over {"paused": its migration (live-…), "regions": [...]}');
  return { regions: parseHandshake(Buffer.from(JSON.stringify(regions))), pausedFor: paused };
}

/** Page ranges of a live image (its one region), merged as they are added. */
export class Ranges {
  readonly #pairs: number[] = [];

  add(first: number, count: number): void {
    if (count <= 0) return;
    const n = this.#pairs.length;
    if (n && this.#pairs[n - 2] + this.#pairs[n - 1] === first) this.#pairs[n - 1] += count;
    else this.#pairs.push(first, count);
  }

  addAll(other: Ranges): void {
    for (let i = 0; i < other.#pairs.length; i += 2) this.add(other.#pairs[i], other.#pairs[i + 1]);
  }

  get pages(): number {
    let n = 0;
    for (let i = 1; i < this.#pairs.length; i += 2) n += this.#pairs[i];
    return n;
  }

  /** u64 LE pairs (region 0 << 48 | first page, count), as the native session takes them. */
  encode(): Buffer {
    const out = Buffer.alloc(this.#pairs.length * 8);
    for (let i = 0; i < this.#pairs.length; i++) out.writeBigUInt64LE(BigInt(this.#pairs[i]), i * 8);
    return out;
  }
}

/** How a live migration goes from precopy to the workload running at the destination. */
export interface LiveOptions {
  /**
   * precopy+postcopy (default): rounds while the workload runs, then the
   * switchover, then postcopy for what is still missing; postcopy: the
   * workload pauses at once, everything moves after the switchover; precopy:
   * rounds until what is left fits the downtime limit (or the round limit),
   * then those pages go while it is paused, before the destination runs.
   */
  mode?: 'precopy+postcopy' | 'postcopy' | 'precopy';
  /** Switch over once the pages left would take at most this long at the rate measured (default 300 ms). */
  downtimeLimitMs?: number;
  /** Switch over after this many rounds at most (default 30): a workload that writes faster than the link never converges. */
  maxPrecopyRounds?: number;
  /** Switch over at the first round's end after this long, converged or not (default: never). */
  postcopyAfterMs?: number;
  /** Switch over once this many rounds in a row left no fewer pages written than the one before (default 5; 0: never). */
  maxStalledRounds?: number;
  /** Waiting for the workload to pause (default 10 s). */
  pauseTimeoutMs?: number;
  logger?: Logger;
}

/** What happened, for the log and the bench. */
export interface LiveReport {
  /** The migration's name: the workload stays paused for it here (`serve --live --resume-workload` names it). */
  migration: string;
  mode: NonNullable<LiveOptions['mode']>;
  rounds: number;
  pagesPerRound: number[];
  /** Why the switchover came: the pages left fit the downtime limit, the round limit, the time limit, or a request. */
  switchoverBy: 'downtime-limit' | 'max-rounds' | 'postcopy-after' | 'request' | 'no-progress' | 'postcopy';
  pagesDiscarded: number;
  /** Of those, dropped before the pause, while the workload still ran (discard rounds). */
  pagesDiscardedAhead: number;
  /** Link rate measured over the rounds (bytes/s). */
  rateBytesPerSecond: number;
  /** From the workload pausing here to the destination saying it runs. */
  pauseMs: number;
  precopyMs: number;
}

/** The session a migration drives (server/session.ts SourceSession): pages to send now, then the switchover. */
export interface PrecopyTarget {
  /** Pages to send now (Ranges, encoded). */
  precopyRound(ranges: Uint8Array): void;
  /** Of these pages (written since sent, the workload running), the destination drops those it holds now. */
  discardRound(ranges: Uint8Array): void;
  /** The destination says when each discard round is applied (else only when it was sent is known). */
  readonly acksDiscards: boolean;
  /** The workload paused: the pages written since the last round; the destination runs once they are discarded. */
  switchover(written: Uint8Array): void;
}

/** Discard rounds before the pause, at most (each holds what was written during the one before). */
const DISCARD_ROUNDS = 3;
/** Fewer stale pages than this are dropped during the pause: a round would cost more than it saves. */
const DISCARD_AHEAD_PAGES = 256;
/** The longest a discard round waits to be said applied before the pause goes ahead anyway. */
const DROPPED_WAIT_MS = 2000;

/** precopy: rounds go out; switching: the workload pauses and the switchover goes out; postcopy: the destination runs. */
export type LiveState = 'precopy' | 'switching' | 'postcopy' | 'migrated' | 'aborted';

const TRANSITIONS: TransitionTable<LiveState> = {
  precopy: ['switching', 'aborted'],
  switching: ['postcopy', 'aborted'],
  postcopy: ['migrated', 'aborted'],
  migrated: [],
  aborted: [],
};

/**
 * Events: 'report' (LiveReport) once the destination runs; 'finished' once it
 * holds every page; 'aborted' (CodedError) when the migration ended before
 * the switchover (the workload goes on at the source).
 */
export class LiveMigration extends EventEmitter {
  readonly workload: LiveWorkload;
  readonly #options: Required<Omit<LiveOptions, 'postcopyAfterMs' | 'logger'>> & { postcopyAfterMs?: number };
  readonly #log: Logger;
  #machine: StateMachine<LiveState> | null = null;
  #requested = false;
  /** Cuts the round under way short: a switchover was asked for, or the time limit came. */
  #interrupt: ((by: 'request' | 'postcopy-after') => void) | null = null;
  #running: (() => void) | null = null;
  /** Ends the migration under way with an error (the destination left before the switchover). */
  #cancel: ((err: CodedError) => void) | null = null;
  /** The switchover marker went to the destination: from then on it may run the workload, which stays paused here. */
  #switchSent = false;
  /** Pages dropped at the destination by discard rounds, before the pause. */
  #discardedAhead = 0;
  /** The last discard round the destination said it applied (its answer may come before the round's own sent event). */
  #droppedUpTo = 0;

  constructor(workload: LiveWorkload, options: LiveOptions = {}) {
    super();
    this.workload = workload;
    this.#log = options.logger ?? silentLogger;
    this.#options = {
      mode: options.mode ?? 'precopy+postcopy',
      downtimeLimitMs: options.downtimeLimitMs ?? 300,
      maxPrecopyRounds: options.maxPrecopyRounds ?? 30,
      maxStalledRounds: options.maxStalledRounds ?? 5,
      pauseTimeoutMs: options.pauseTimeoutMs ?? 10_000,
      ...(options.postcopyAfterMs !== undefined ? { postcopyAfterMs: options.postcopyAfterMs } : {}),
    };
    // A workload paused past its switchover (its source restarted): its destination runs; this serves it what it lacks.
    if (workload.pausedFor) {
      this.#machine = new StateMachine<LiveState>('live', 'postcopy', TRANSITIONS, this.#log);
      this.#log.info({ migration: workload.pausedFor }, 'live: re-adopted after the switchover; waiting for the destination to resume');
    }
  }

  get state(): LiveState | 'waiting' {
    return this.#machine?.state ?? 'waiting';
  }

  /**
   * The switchover went to the destination (or this source re-adopted the
   * workload after it): the destination may run the workload now, and the
   * paused workload's memory here is what it is served from. A lost
   * destination is then waited for (it resumes), never abandoned.
   */
  get pastSwitchover(): boolean {
    return this.#switchSent || this.state === 'postcopy' || this.state === 'migrated';
  }

  /** Switch over now: the round under way stops where it is (a user's request, e.g. SIGUSR2). */
  requestSwitchover(): void {
    this.#requested = true;
    this.#log.info('switchover requested');
    this.#interrupt?.('request');
  }

  /** The destination is gone: before the switchover the migration ends and the workload goes on here. */
  abort(err: CodedError): void {
    this.#cancel?.(err);
  }

  /** The native session's precopy events (the session forwards them: its start's onPrecopyEvent). */
  onSessionEvent(event: NativeEvent): void {
    if (event.type === 'round-sent' || event.type === 'discard-round-sent' || event.type === 'switched-over') this.emit(event.type, event);
  }

  /**
   * The destination says its workload runs (after the switchover marker), or
   * it resumed past the switchover: a destination comes back only once the
   * marker reached it (before, its loss ends its session), so it runs.
   */
  destinationRunning(): void {
    this.#running?.();
  }

  /** The destination applied discard round `round` (and every one before it: they are applied in order). */
  discardsDropped(round: number): void {
    this.#droppedUpTo = Math.max(this.#droppedUpTo, round);
    this.emit('discards-dropped', round);
  }

  /**
   * Moves the workload to the destination of `session` (its native session
   * started in precopy). `precopy`: the destination can take precopy rounds
   * (else the workload pauses at once: pure postcopy). Resolves once the
   * destination runs; rejects (and the workload goes on here) when the
   * workload or the destination goes before the switchover.
   */
  async run(session: PrecopyTarget, precopy: boolean): Promise<LiveReport> {
    if (this.#machine) throw new PostcopyError(ErrorCode.UNSUPPORTED, 'a live workload moves to one destination');
    const machine = new StateMachine<LiveState>('live', 'precopy', TRANSITIONS, this.#log);
    this.#machine = machine;
    const mode = precopy ? this.#options.mode : 'postcopy';
    if (!precopy && this.#options.mode !== 'postcopy') this.#log.warn('the destination cannot take precopy rounds: pure postcopy');
    const workload = this.workload;
    // Every wait ends early when the workload goes or the destination leaves.
    const gone = new Promise<never>((_, reject) => {
      workload.once('gone', reject);
      this.#cancel = reject;
    });
    gone.catch(() => {});
    const started = performance.now();
    const perRound: number[] = [];
    let bytes = 0;
    let ns = 0;
    let switchoverBy: LiveReport['switchoverBy'] = 'postcopy';
    const left = new Ranges(); // written and not queued since: stale at the destination
    try {
      workload.startTracking();
      if (mode !== 'postcopy') {
        let queue = workload.everything();
        let previous = Infinity;
        let stalled = 0;
        // A request or the time limit ends precopy at once, mid-round: what the round had left to send is stale at the destination (the native session knows which).
        const interrupted = new Promise<'request' | 'postcopy-after'>((resolve) => (this.#interrupt = resolve));
        const limit = this.#options.postcopyAfterMs !== undefined ? setTimeout(() => this.#interrupt?.('postcopy-after'), this.#options.postcopyAfterMs) : null;
        if (this.#requested) this.#interrupt?.('request');
        for (;;) {
          const sent = this.#roundSent();
          session.precopyRound(queue.encode());
          const round = await Promise.race([sent, gone, interrupted]);
          if (typeof round === 'string') {
            switchoverBy = round;
            perRound.push(queue.pages);
            break;
          }
          perRound.push(queue.pages);
          bytes += round.bytes;
          ns += round.ns;
          const written = workload.written();
          const rate = ns > 0 ? (bytes / ns) * 1e9 : Infinity;
          const dueMs = ((written.pages * PAGE) / rate) * 1e3;
          this.#log.info({ round: perRound.length, pages: queue.pages, writtenSince: written.pages, rateMBps: Math.round(rate / 1e6) }, 'precopy round sent');
          stalled = written.pages >= previous ? stalled + 1 : 0;
          previous = written.pages;
          const by: LiveReport['switchoverBy'] | null = this.#requested
            ? 'request'
            : dueMs <= this.#options.downtimeLimitMs
              ? 'downtime-limit'
              : perRound.length >= this.#options.maxPrecopyRounds
                ? 'max-rounds'
                : this.#options.postcopyAfterMs !== undefined && performance.now() - started >= this.#options.postcopyAfterMs
                  ? 'postcopy-after'
                  : this.#options.maxStalledRounds > 0 && stalled >= this.#options.maxStalledRounds
                    ? 'no-progress'
                    : null;
          if (by) {
            switchoverBy = by;
            left.addAll(mode === 'precopy+postcopy' ? await this.#discardAhead(session, written, gone) : written);
            break;
          }
          queue = written;
        }
        if (limit) clearTimeout(limit);
        this.#interrupt = null;
      }
      const precopyMs = performance.now() - started;
      machine.to('switching', { by: switchoverBy, rounds: perRound.length, migration: workload.image.fingerprint });
      await Promise.race([workload.pause(this.#options.pauseTimeoutMs), gone]);
      const pausedAt = performance.now();
      left.addAll(workload.written());
      if (mode === 'precopy' && left.pages > 0) {
        // Precopy alone: what is left goes now, while the workload is paused; nothing is stale after it.
        const sent = this.#roundSent();
        session.precopyRound(left.encode());
        await Promise.race([sent, gone]);
        perRound.push(left.pages);
      }
      const switched = new Promise<NativeEvent & { type: 'switched-over' }>((resolve) => this.once('switched-over', resolve));
      const running = new Promise<void>((resolve) => (this.#running = resolve));
      session.switchover(mode === 'precopy' ? Buffer.alloc(0) : left.encode());
      this.#switchSent = true;
      const done = await Promise.race([switched, gone]);
      await Promise.race([running, gone]);
      const report: LiveReport = {
        migration: workload.image.fingerprint,
        mode,
        rounds: perRound.length,
        pagesPerRound: perRound,
        switchoverBy,
        pagesDiscarded: done.discarded,
        pagesDiscardedAhead: this.#discardedAhead,
        rateBytesPerSecond: ns > 0 ? Math.round((bytes / ns) * 1e9) : 0,
        pauseMs: Math.round((performance.now() - pausedAt) * 100) / 100,
        precopyMs: Math.round(precopyMs * 100) / 100,
      };
      machine.to('postcopy', report as unknown as Record<string, unknown>);
      this.emit('report', report);
      return report;
    } catch (err) {
      const e = asCodedError(err);
      if (machine.can('aborted')) machine.to('aborted', { code: e.code, error: e.message });
      // Before the switchover the workload is still ours to run: it goes on here. After it, the
      // destination may run already: the workload stays paused (the session resumes from its memory).
      if (!this.#switchSent) workload.resume();
      this.emit('aborted', e);
      throw e;
    }
  }

  /** A destination that cannot take precopy: the workload pauses before its first page goes (pure postcopy, no switchover marker). */
  async pauseForPostcopy(): Promise<void> {
    // The destination resumes after the switchover (a link cut, or this source restarted): the workload is paused already.
    if (this.pastSwitchover) return;
    if (this.#machine) throw new PostcopyError(ErrorCode.UNSUPPORTED, 'a live workload moves to one destination');
    const machine = new StateMachine<LiveState>('live', 'precopy', TRANSITIONS, this.#log);
    this.#machine = machine;
    machine.to('switching', { by: 'postcopy', reason: 'the destination cannot take precopy rounds', migration: this.workload.image.fingerprint });
    try {
      await this.workload.pause(this.#options.pauseTimeoutMs);
    } catch (err) {
      machine.to('aborted', { code: asCodedError(err).code });
      throw err;
    }
    machine.to('postcopy');
  }

  /** The destination has every page: the workload may exit. */
  finished(): void {
    if (this.#machine?.can('migrated')) this.#machine.to('migrated');
    this.workload.migrated();
    this.emit('finished');
  }

  /**
   * Postcopy follows: what the destination holds stale is dropped there now,
   * while the workload runs, in discard rounds, each holding what was written
   * during the one before, while that shrinks (at most DISCARD_ROUNDS). The
   * pause then drops only what was written during the last one. Returns it.
   */
  async #discardAhead(session: PrecopyTarget, written: Ranges, gone: Promise<never>): Promise<Ranges> {
    let stale = written;
    for (let round = 0; round < DISCARD_ROUNDS && stale.pages >= DISCARD_AHEAD_PAGES; round++) {
      const sent = new Promise<{ pages: number; ns: number; round: number }>((resolve) => this.once('discard-round-sent', resolve));
      session.discardRound(stale.encode());
      const done = await Promise.race([sent, gone]);
      // Applied there, not only sent: what the destination has still to drop would otherwise be dropped in the pause.
      // Bounded: a destination slow to answer costs a longer pause, never a wait without end.
      if (session.acksDiscards) await this.#dropped(done.round, gone);
      this.#discardedAhead += done.pages;
      const next = this.workload.written();
      this.#log.info(
        { round: round + 1, pages: stale.pages, dropped: done.pages, ms: Math.round(done.ns / 1e4) / 100, writtenSince: next.pages },
        'discard round sent',
      );
      const shrinking = next.pages < stale.pages / 2;
      stale = next;
      if (!shrinking) break;
    }
    return stale;
  }

  /** Resolves when the destination has said discard round `round` is applied, or after DROPPED_WAIT_MS; rejects as `gone` does. */
  #dropped(round: number, gone: Promise<never>): Promise<void> {
    if (this.#droppedUpTo >= round) return Promise.resolve();
    let timer: NodeJS.Timeout | undefined;
    let on: ((n: number) => void) | undefined;
    const answered = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        this.#log.warn({ round, waitedMs: DROPPED_WAIT_MS }, 'the destination did not say the discard round was applied; pausing anyway');
        resolve();
      }, DROPPED_WAIT_MS);
      on = () => {
        if (this.#droppedUpTo >= round) resolve();
      };
      this.on('discards-dropped', on);
    });
    return Promise.race([answered, gone]).finally(() => {
      clearTimeout(timer);
      this.off('discards-dropped', on!);
    });
  }

  #roundSent(): Promise<{ pages: number; bytes: number; ns: number }> {
    return new Promise((resolve) => this.once('round-sent', resolve));
  }
}
