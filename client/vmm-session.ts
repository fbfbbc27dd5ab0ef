// One VMM served by the handler, from its handshake to its hang-up: its page
// session (opened by client/open-session.ts over its guest memory), the
// check of what went into the guest, its working set, and its own life as a
// small state table:
//
//   starting: its page session is being opened; the userfaultfd stays open
//             (its number must not be reused) until the opening returns
//   serving:  the session runs; the guest faults pages in
//   refused:  the opening failed (the handshake does not fit, or the source
//             refused): the guest is poisoned, then it ends
//   leaving:  the VMM hung up (or the handler closed) while its session was
//             being opened: everything is torn down but what the opening
//             still holds, released once it returns
//   ended:    everything it handed over is closed
import { EventEmitter } from 'node:events';
import { closeSync } from 'node:fs';
import type { Socket } from 'node:net';
import { ErrorCode, PostcopyError, asCodedError, type CodedError } from '../lib/errors.js';
import type { GuestRegion } from '../lib/vmm-handshake.js';
import type { Logger } from '../lib/logger.js';
import type { Tally } from '../lib/metrics.js';
import { StateMachine, type TransitionTable } from '../lib/state-machine.js';
import type { TransferOptions } from '../lib/transfer.js';
import type { DestinationStats } from './fault-engine.js';
import type { DestinationSessionOptions, PageSession, RecoveryStatus } from './session.js';
import type { LocalSessionOptions } from './local-session.js';
import type { StoreSessionOptions } from './store-session.js';
import type { Template } from './template.js';
import { openSession, type PagesFrom } from './open-session.js';
import { GuestMemory, poisonGuest } from './guest-memory.js';
import { layoutOf, pagesIn, writeWorkingSet } from './working-set.js';
import { summarize, type RestoreReport } from './report.js';
import { LATENCY_BOUNDS_NS } from './handler-totals.js';
import { checkAgainstSource, type InstalledCheck } from './installed-checksum.js';

export type VmmState = 'starting' | 'serving' | 'refused' | 'leaving' | 'ended';

const TRANSITIONS: TransitionTable<VmmState> = {
  starting: ['serving', 'refused', 'leaving'],
  serving: ['ended'],
  refused: ['ended'],
  leaving: ['ended'],
  ended: [],
};

/** While a working set is recorded, the background starts once the guest has not faulted for this long. */
export const RECORD_QUIET_MS = 1000;

export interface VmmSessionSummary extends RestoreReport {
  vmmPid: number;
  removedPages: number;
  zeroFilledAfterRemove: number;
  poisonedPages: number;
  complete: boolean;
  /** The pages installed in the guest compared with the source image (null: the session ended before the check). */
  installedCheck: InstalledCheck | null;
  recovery: RecoveryStatus | null;
}

/** How a VMM session ended: its summary, and its final figures for the handler's totals. */
export interface VmmEnded {
  report: VmmSessionSummary;
  stats: DestinationStats;
  /** For each of LATENCY_BOUNDS_NS, the faults that waited at most that long. */
  latencyBuckets: number[];
}

/** What a VMM session needs of its handler. */
export interface VmmHost {
  /** Where the pages come from (the handler's options: a source, a local image, or an image in a store), with how to serve them. */
  options: (DestinationSessionOptions | LocalSessionOptions | StoreSessionOptions) & { inPlace?: boolean; recordWorkingSet?: string };
  transfer: TransferOptions;
  /** The template every VMM is a clone of, when there is one. */
  template: () => Promise<Template> | null;
  /** Errors by code, for the handler's figures. */
  errors: Tally;
  log: Logger;
}

export interface VmmArrival {
  pid: number;
  socket: Socket;
  uffd: number;
  memfd?: number;
  guest: GuestRegion[];
  takeover: boolean;
}

/**
 * Events: 'started' (the guest is served), 'installed-check' ({vmmPid,
 * ...InstalledCheck}), 'ended' (VmmEnded | null: null when it never had a
 * session; reason): once, when the handler should let go of it.
 */
export class VmmSession extends EventEmitter {
  readonly pid: number;
  readonly #vmm: VmmArrival;
  readonly #host: VmmHost;
  readonly #log: Logger;
  readonly #machine: StateMachine<VmmState>;
  readonly #memory: GuestMemory;
  /** Stops a first connection still being retried once the VMM is gone. */
  readonly #abort = new AbortController();
  #session: PageSession | null = null;
  #installedCheck: InstalledCheck | null = null;
  /** While recording: waits for the guest's faults to go quiet, then starts the background. */
  #quietWatch: NodeJS.Timeout | null = null;

  constructor(vmm: VmmArrival, host: VmmHost) {
    super();
    this.pid = vmm.pid;
    this.#vmm = vmm;
    this.#host = host;
    this.#log = host.log.child({ vmmPid: vmm.pid });
    this.#machine = new StateMachine<VmmState>('VMM', 'starting', TRANSITIONS, this.#log);
    this.#memory = new GuestMemory({
      pid: vmm.pid,
      uffd: vmm.uffd,
      ...(vmm.memfd !== undefined ? { memfd: vmm.memfd } : {}),
      guest: vmm.guest,
      takeover: vmm.takeover,
      recording: host.options.recordWorkingSet !== undefined,
      gone: () => this.gone,
      logger: this.#log,
    });
  }

  get state(): VmmState {
    return this.#machine.state;
  }

  /** The VMM hung up (or the handler let go of it). */
  get gone(): boolean {
    return this.#machine.is('leaving', 'ended');
  }

  /** Its page session, once open. */
  get session(): PageSession | null {
    return this.#session;
  }

  /**
   * Opens its page session and serves the guest. Rejects when the VMM is
   * refused: its guest is poisoned then (it handed its userfaultfd over, and
   * a touch would wait forever), and the rejection says why.
   */
  async start(): Promise<void> {
    try {
      await this.#open();
    } catch (err) {
      if (!this.#machine.is('starting')) return; // the VMM hung up first
      this.#machine.to('refused', { code: asCodedError(err).code });
      const poisonedBytes = poisonGuest(this.#vmm.uffd, this.#vmm.guest);
      this.end('handshake refused');
      throw Object.assign(asCodedError(err), { poisonedBytes });
    } finally {
      // The VMM hung up during set-up: what the opening held is let go of now.
      if (this.#machine.is('leaving')) {
        this.#session?.close();
        this.#release();
        this.#machine.to('ended');
      }
    }
    if (this.#machine.is('starting')) this.#serve();
  }

  async #open(): Promise<void> {
    const { options } = this.#host;
    const recording = options.recordWorkingSet !== undefined;
    const pendingTemplate = this.#host.template();
    const template = pendingTemplate ? await pendingTemplate : null;
    if (template) {
      // A plain VMM would never see the MINOR faults a clone is served by: refused with the reason (and poisoned).
      const why = template.notClonedBy(this.pid, this.#vmm.guest);
      if (why)
        throw new PostcopyError(
          ErrorCode.TEMPLATE_NOT_MAPPED,
          `this handler serves clones of template ${JSON.stringify(template.name)}, and this VMM is not one: ${why}; map the template it is offered (docs/VMM-HANDSHAKE.md, "Templates")`,
        );
    }
    const replay = recording ? { window: { forward: 0, backward: 0 }, holdBackground: true } : {};
    const from: PagesFrom = template
      ? { kind: 'template', template, logger: this.#log }
      : 'image' in options
        ? { kind: 'image', ...options, ...replay, logger: this.#log }
        : 'storeImage' in options
          ? { kind: 'store', ...(options as StoreSessionOptions), ...replay, logger: this.#log }
          : {
              kind: options.inPlace ? 'in-place' : 'source',
              ...options,
              ...replay,
              logger: this.#log,
              // The guest is already waiting: a source not reachable yet is retried like an outage.
              retryFirstConnect: true,
              signal: this.#abort.signal,
            };
    try {
      const opened = await openSession(from, this.#memory);
      if (opened.kind !== 'session') throw new PostcopyError(ErrorCode.INTERNAL, 'guest memory is never mapped in place');
      this.#session = opened.session;
    } catch (err) {
      // The handshake does not fit the image, or this source cannot serve it: refused.
      if (this.#memory.built || this.gone || asCodedError(err).code === ErrorCode.UNSUPPORTED) throw err;
      // The source stayed out of reach past the give-up time: the guest must not wait forever on memory that cannot come.
      const poisoned = poisonGuest(this.#vmm.uffd, this.#vmm.guest);
      const e = err as PostcopyError;
      this.#log.error(
        { code: e.code, err: e.message, poisonedBytes: poisoned },
        'the source cannot be reached: every missing guest page poisoned (SIGBUS on touch)',
      );
      this.end('the source cannot be reached');
      return;
    }
    if (recording) this.#startBackgroundWhenQuiet(this.#session);
  }

  /** The session is open: the guest is served until it hangs up; once every page is resident, what went in is checked. */
  #serve(): void {
    const session = this.#session!;
    const log = this.#log;
    this.#machine.to('serving', { session: session.status().session });
    this.emit('started');
    session.on('paused', (err: CodedError) => this.#host.errors.add(err.code));
    session.on('failed', (err: CodedError) => {
      this.#host.errors.add(err.code);
      if (this.gone) return;
      try {
        const poisoned = session.engine.poisonMissing();
        log.error(
          { code: err.code, err: err.message, poisonedPages: poisoned },
          'gave up on the source: the missing guest pages are poisoned (SIGBUS on touch)',
        );
      } catch (e) {
        log.error({ code: err.code, err: err.message, poisonError: (e as Error).message }, 'gave up on the source, and poisoning the missing pages failed');
      }
    });
    session
      .whenResident()
      .then(
        () => this.#checkInstalled(session),
        () => {}, // failures are logged by the session and handled above
      )
      .catch((err) => {
        if (this.gone) log.info({ err: (err as Error).message }, 'the VMM left before its pages were checked against the source');
        else log.warn({ code: asCodedError(err).code, err: (err as Error).message }, 'finishing with the source failed');
      });
  }

  async #checkInstalled(session: PageSession): Promise<void> {
    const log = this.#log;
    const { check, pagesSent } = await checkAgainstSource(session, this.#host.transfer);
    this.#installedCheck = check;
    if (check.result === 'mismatch') {
      this.#host.errors.add(ErrorCode.DIGEST_MISMATCH);
      session.release();
      log.error({ code: ErrorCode.DIGEST_MISMATCH, ...check }, 'every guest page is resident, but pages installed in the guest differ from the source image');
    } else if (check.result === 'match') {
      session.verified({ checkedPages: check.checkedPages });
      log.info({ sourcePagesSent: pagesSent, checkedPages: check.checkedPages }, 'every guest page is resident and matches the source image');
    } else {
      session.release();
      const why = {
        'older-source':
          session.status().session === 'store'
            ? 'they came from a store, in chunks each checked against its hash before it was installed'
            : 'the source is too old to check them',
        'too-fragmented': 'the pages left out are too fragmented to list (over 100000 ranges a region)',
        'nothing-installed': 'no page was installed from the source',
      }[check.unchecked ?? 'nothing-installed'];
      log.warn({ sourcePagesSent: pagesSent, unchecked: check.unchecked }, `every guest page is resident; the installed pages were not checked: ${why}`);
    }
    this.emit('installed-check', { vmmPid: this.pid, ...check });
  }

  /** While recording: the background starts once the guest's faults go quiet (or it never faulted for a while). */
  #startBackgroundWhenQuiet(session: PageSession): void {
    let faults = -1;
    let quietSince = Date.now();
    const watch = setInterval(() => {
      if (this.gone) return clearInterval(watch);
      const now = session.engine.stats().faults;
      if (now !== faults) {
        faults = now;
        quietSince = Date.now();
        return;
      }
      if (Date.now() - quietSince >= (faults > 0 ? RECORD_QUIET_MS : 5 * RECORD_QUIET_MS)) {
        clearInterval(watch);
        this.#log.info({ faults }, 'the guest stopped faulting: working set recorded so far; background started');
        session.startBackground();
      }
    }, RECORD_QUIET_MS / 4);
    watch.unref();
    this.#quietWatch = watch;
  }

  /** Ends the session: stops it, writes its working set, closes what the VMM handed over (once nothing can use it) and says how it went. */
  end(reason: string): void {
    if (this.gone) return;
    // Opening still under way: what it holds is released when it returns (start()).
    this.#machine.to(this.#machine.is('starting') ? 'leaving' : 'ended', { reason });
    this.#abort.abort();
    if (this.#quietWatch) clearInterval(this.#quietWatch);
    // Stop first: the final figures are read once every engine thread has finished.
    const session = this.#session;
    session?.close();
    if (session) this.#writeWorkingSet(session);
    const stats = session?.stats();
    if (this.#machine.is('ended')) this.#release();
    this.#vmm.socket.destroy();
    const ended: VmmEnded | null =
      session && stats ? { report: this.#summary(session, stats), stats, latencyBuckets: session.engine.latencyBuckets(LATENCY_BOUNDS_NS) } : null;
    this.emit('ended', ended, reason);
  }

  #summary(session: PageSession, stats: DestinationStats): VmmSessionSummary {
    return {
      ...summarize(stats, this.#host.transfer, session.engine.regions),
      vmmPid: this.pid,
      removedPages: stats.removedPages,
      zeroFilledAfterRemove: stats.zeroFilledAfterRemove,
      poisonedPages: stats.poisonedPages,
      complete: stats.residentPages === stats.totalPages && stats.poisonedPages === 0,
      installedCheck: this.#installedCheck,
      recovery: session.status(),
    };
  }

  /** Writes the session's working set (recordWorkingSet) once its engine has stopped. */
  #writeWorkingSet(session: PageSession): void {
    const path = this.#host.options.recordWorkingSet;
    if (path === undefined) return;
    try {
      const set = { ...layoutOf(session.regions), fingerprint: session.fingerprint, entries: session.engine.faultedPages() };
      writeWorkingSet(path, set);
      this.#log.info({ pages: pagesIn(set), file: path }, 'working set recorded');
    } catch (err) {
      this.#log.error({ err: (err as Error).message, file: path }, 'writing the working set failed');
    }
  }

  /** Closes what the VMM handed over (its userfaultfd, its memory file) and unmaps our view of its memory, once no engine thread can use them. */
  #release(): void {
    this.#memory.release();
    closeSync(this.#vmm.uffd);
    if (this.#vmm.memfd !== undefined) closeSync(this.#vmm.memfd);
  }
}
