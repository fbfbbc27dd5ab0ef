// The page-fault handler a VMM hands its guest memory to (Firecracker style):
// listens on a unix socket; each VMM connects and sends, in one message, a JSON
// array describing its memory regions with its userfaultfd attached
// (SCM_RIGHTS). Each VMM gets its own session with the source and its own
// native fault engine, in a DestinationSession that pauses and resumes when
// the source is lost (or, serving a local image, a LocalSession: no source). Its hang-up ends the session and frees everything; the
// VMM's memory is never ours to unmap. Should the source stay out of reach
// past the give-up time, the pages still missing are poisoned: the guest gets
// SIGBUS instead of hanging or reading zeros.
import { EventEmitter } from 'node:events';
import { closeSync, fstatSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { ErrorCode, PostcopyError, asCodedError } from '../lib/errors.js';
import { isUserfaultfd, parseHandshake, type GuestRegion } from '../lib/vmm-handshake.js';
import { receiveFds, peerCredentials, sendFds, socketFd } from '../lib/fd-passing.js';
import { hasOverlap } from '../lib/validate.js';
import { mapFile, type Mapping } from '../lib/memory.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { native } from '../lib/native.js';
import { residentBitmap } from '../lib/pagemap.js';
import { listenOwnerOnly } from '../lib/unix-socket.js';
import type { MessageOf, RegionInfo } from '../lib/protocol.js';
import { SourceConnection } from './source-connection.js';
import { LATENCY_BOUNDS_S, Tally } from '../lib/metrics.js';
import type { DestinationStats } from '../lib/native.js';
import { transferOptions, type TransferOptions } from '../lib/transfer.js';
import { DestinationSession, sourcesOf, type DestinationSessionOptions, type EngineFactory, type PageSession, type RecoveryStatus } from './session.js';
import { LocalSession, type LocalSessionOptions } from './local-session.js';
import { Template } from './template.js';
import { Image } from '../lib/image.js';
import { layoutOf, pagesIn, writeWorkingSet } from './working-set.js';
import { FaultEngine, type MemoryEvent, type TargetRegion } from './fault-engine.js';
import { summarize, type RestoreReport } from './report.js';
import { checkAgainstSource, type InstalledCheck } from './installed-checksum.js';

export { parseHandshake, type GuestRegion };

/** Where each VMM's pages come from: a source (`source`) or a local image (`image`, shared by every VMM). */
export type VmmHandlerOptions = (DestinationSessionOptions | LocalSessionOptions) & {
  /** A VMM that connects but sends no handshake within this is dropped (default 10 s). */
  handshakeTimeoutMs?: number;
  /** Log each live VMM session's progress this often (default 10 s; 0: never). */
  progressIntervalMs?: number;
  /**
   * Record each VMM session's working set (the pages its guest faulted on
   * while missing, in first-touch order) to this file when the session ends.
   * Faults are served alone (no window) and the background waits until the
   * guest's faults go quiet, so the set holds exactly the pages it touched.
   */
  recordWorkingSet?: string;
  /**
   * With a source on this host whose image is shared memory: take its memory
   * in place (its fds) for each VMM session and serve the faults from it in
   * this process, as from a local image: no page crosses a socket, and the
   * session no longer needs the source once it has the fds. Any other
   * source is served over its data channels as usual.
   */
  inPlace?: boolean;
  /**
   * Serve every VMM as a clone of one template of this name
   * (client/template.ts): the image is filled once into shared memory here,
   * each VMM is offered it before its handshake and maps it privately, and
   * its faults are answered from it. N guests hold one copy of the image plus
   * what each writes, and the source sends each page at most once for all.
   */
  template?: string;
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

interface VmmSession {
  pid: number;
  socket: Socket;
  uffd: number;
  /** MINOR mode: the guest's memory file, and this process's mappings of its regions (until the engine stopped). */
  memfd?: number;
  fills: Mapping[];
  guest: GuestRegion[];
  session: PageSession | null;
  ended: boolean;
  /** #start is under way: the uffd must stay open (its number must not be reused) until it returns. */
  starting: boolean;
  /** Stops a first connection still being retried once the VMM is gone. */
  abort: AbortController;
  takeover: boolean;
  handoff?: number;
  installedCheck?: InstalledCheck;
  /** While recording: waits for the guest's faults to go quiet, then starts the background. */
  quietWatch?: NodeJS.Timeout;
  /** In place: the source's memory this session serves from, and its fds (until the engine stopped). */
  taken?: { image: Image; fds: number[] };
}

/** The histogram's bounds in ns, and one past them all: the count comes from the same read as the buckets, so they always agree. */
const LATENCY_BOUNDS_NS = [...LATENCY_BOUNDS_S.map((s) => s * 1e9), Infinity];

/** Running totals over VMM sessions (a Prometheus counter each). */
export interface HandlerTotals {
  faults: number;
  blockedNs: number;
  pagesOnDemand: number;
  pagesWindow: number;
  pagesBackground: number;
  zeroPages: number;
  duplicatePages: number;
  bytesReceived: number;
  latencyBuckets: number[];
  latencyCount: number;
  latencySumNs: number;
}

/** VmmHandler.figures(): sessions by state now, totals since start, errors by code. */
export interface HandlerFigures {
  sessions: Record<string, number>;
  totals: HandlerTotals;
  errors: [string, number][];
}

function emptyTotals(): HandlerTotals {
  return {
    faults: 0,
    blockedNs: 0,
    pagesOnDemand: 0,
    pagesWindow: 0,
    pagesBackground: 0,
    zeroPages: 0,
    duplicatePages: 0,
    bytesReceived: 0,
    latencyBuckets: LATENCY_BOUNDS_S.map(() => 0),
    latencyCount: 0,
    latencySumNs: 0,
  };
}

function addTotals(t: HandlerTotals, s: DestinationStats, buckets: number[]): void {
  t.faults += s.faults;
  t.blockedNs += s.blockedNs;
  t.pagesOnDemand += s.pagesInstalledRequested;
  t.pagesWindow += s.pagesInstalledPrefault;
  t.pagesBackground += s.pagesInstalledBackground;
  t.zeroPages += s.zeroPages;
  t.duplicatePages += s.duplicatePages;
  t.bytesReceived += s.bytesReceived;
  buckets.slice(0, -1).forEach((n, i) => (t.latencyBuckets[i] += n));
  t.latencyCount += buckets[buckets.length - 1];
  t.latencySumNs += s.faultLatency.sumNs;
}

/** A VMM's connection, its userfaultfd and its handshake JSON, ready to be served. */
export interface VmmHandoff {
  pid: number;
  socket: Socket;
  uffd: number;
  /** The guest's memory file, when the VMM sent one (MINOR mode). */
  memfd?: number;
  payload: Buffer;
  takeover?: boolean;
  /** The supervisor's number for this VMM, echoed in 'released'. */
  handoff?: number;
}

/** Connections still to send their handshake, each with what stops the wait (before the socket is closed). */
export class PendingHandshakes extends Map<Socket, AbortController> {
  /** Stops every wait, then closes the sockets. */
  dropAll(): void {
    for (const [socket, abort] of this) {
      abort.abort();
      socket.destroy();
    }
    this.clear();
  }
}

/** The most VMM connections that may wait to send their handshake at once; more are closed at once. */
export const MAX_PENDING_HANDSHAKES = 64;

/**
 * A new VMM connection: who it is (SO_PEERCRED) and its handshake. Refused at
 * once (ERR_OVERLOADED) while MAX_PENDING_HANDSHAKES others are still silent;
 * a refusal carries `vmmPid` when known.
 */
export async function acceptVmm(socket: Socket, pending: PendingHandshakes, timeoutMs: number): Promise<VmmHandoff> {
  socket.on('error', () => {});
  const fd = socketFd(socket);
  let pid = 0;
  try {
    pid = peerCredentials(fd).pid;
    if (pending.size >= MAX_PENDING_HANDSHAKES)
      throw new PostcopyError(ErrorCode.OVERLOADED, `${pending.size} VMM connections are still to send their handshake`);
    const abort = new AbortController();
    pending.set(socket, abort);
    try {
      return { pid, socket, ...(await receiveHandshake(fd, timeoutMs, abort.signal)) };
    } finally {
      pending.delete(socket);
    }
  } catch (err) {
    throw Object.assign(asCodedError(err), { vmmPid: pid });
  }
}

/**
 * Reads a VMM's handshake from its socket: the JSON payload with one fd, a
 * userfaultfd, or two: the userfaultfd and the guest's memory file (a memfd or
 * shared-memory file: MINOR mode). The caller owns the returned fds.
 */
export async function receiveHandshake(fd: number, timeoutMs: number, signal?: AbortSignal): Promise<{ payload: Buffer; uffd: number; memfd?: number }> {
  const msg = await receiveFds(fd, { maxBytes: 64 << 10, maxFds: 4, timeoutMs, ...(signal ? { signal } : {}) });
  try {
    if (msg.payload.length === 0) throw new PostcopyError(ErrorCode.PEER_GONE, 'the VMM closed the socket before its handshake');
    if (msg.fds.length !== 1 && msg.fds.length !== 2)
      throw new PostcopyError(
        ErrorCode.PROTOCOL_MALFORMED,
        `the handshake must carry the userfaultfd, and at most the guest's memory file after it, not ${msg.fds.length} fds`,
      );
    if (!isUserfaultfd(msg.fds[0])) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the fd sent is not a userfaultfd');
    if (msg.fds.length === 2 && !fstatSync(msg.fds[1]).isFile())
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the second fd is not a memory file (a memfd or a shared-memory file)');
  } catch (err) {
    for (const f of msg.fds) closeSync(f);
    throw err;
  }
  return { payload: msg.payload, uffd: msg.fds[0], ...(msg.fds.length === 2 ? { memfd: msg.fds[1] } : {}) };
}

/**
 * Events: 'session-start' ({pid}), 'session-end' (VmmSessionSummary),
 * 'rejected' ({pid, code, message}), 'released' ({pid, handoff}): the handler
 * let go of a VMM it adopted, whatever the reason; 'installed-check'
 * ({vmmPid, ...InstalledCheck}): every guest page is resident and the pages
 * installed were compared with the source image.
 */
export class VmmHandler extends EventEmitter {
  readonly #options: VmmHandlerOptions;
  readonly #transfer: TransferOptions;
  readonly #log: Logger;
  readonly #sessions = new Set<VmmSession>();
  /** Errors by code, for the life of the handler. */
  readonly #errors = new Tally();
  /** The figures of VMM sessions that ended, summed. */
  readonly #retired: HandlerTotals = emptyTotals();
  readonly #pending = new PendingHandshakes();
  #server: Server | null = null;
  /** The template every VMM is a clone of (options.template), once the first VMM asked for it. */
  #template: Promise<Template> | null = null;
  /** Templates that failed: closed with the handler (their clones may still map their memory). */
  readonly #spentTemplates: Template[] = [];
  #sourceWatch: NodeJS.Timeout | null = null;
  #progressTimer: NodeJS.Timeout | null = null;

  constructor(options: VmmHandlerOptions) {
    super();
    if (options.template !== undefined && (options.inPlace || options.recordWorkingSet !== undefined))
      throw new PostcopyError(ErrorCode.UNSUPPORTED, "a template's clones share its memory: it cannot also be taken in place or record a clone's working set");
    this.#options = options;
    this.#log = options.logger ?? silentLogger;
    this.#transfer = transferOptions(options);
    const every = options.progressIntervalMs ?? 10_000;
    if (every > 0) {
      this.#progressTimer = setInterval(() => this.#reportProgress(), every);
      this.#progressTimer.unref();
    }
  }

  /** One log record per live VMM session: how far it got, and how its faults fare. */
  #reportProgress(): void {
    for (const vmm of this.#sessions) {
      const session = vmm.session;
      if (!session || vmm.ended) continue;
      const s = session.engine.stats();
      this.#log.info(
        {
          vmmPid: vmm.pid,
          state: session.state,
          residentPages: s.residentPages,
          totalPages: s.totalPages,
          faults: s.faults,
          faultP50Us: Math.round(s.faultLatency.p50Ns / 100) / 10,
          faultP99Us: Math.round(s.faultLatency.p99Ns / 100) / 10,
          blockedMs: Math.round(s.blockedNs / 1e6),
          bytesReceived: s.bytesReceived,
        },
        'VMM session progress',
      );
    }
  }

  get activeSessions(): number {
    return this.#sessions.size;
  }

  /** Listens on `path` (created 0600). */
  async listen(path: string): Promise<void> {
    // pauseOnConnect: no JS read may take the handshake (and its fd) from us.
    const server = createServer({ pauseOnConnect: true }, (socket) => void this.#onVmm(socket));
    await listenOwnerOnly(server, path);
    this.#server = server;
    this.#log.info({ socket: path, ...this.#transfer }, 'waiting for VMMs');
  }

  /** A VMM refused before it reached this handler (by the supervisor in front of it): counted in its errors. */
  noteRefused(code: string): void {
    this.#errors.add(code);
  }

  /** What this handler has done so far, over every VMM session it served: for metrics. */
  figures(): HandlerFigures {
    const totals = { ...this.#retired, latencyBuckets: [...this.#retired.latencyBuckets] };
    const sessions: Record<string, number> = {};
    for (const vmm of this.#sessions) {
      const state = vmm.session?.state ?? 'connecting';
      sessions[state] = (sessions[state] ?? 0) + 1;
      if (vmm.session) addTotals(totals, vmm.session.engine.stats(), vmm.session.engine.latencyBuckets(LATENCY_BOUNDS_NS));
    }
    return { sessions, totals, errors: this.#errors.entries() };
  }

  /** Checks that the source answers and that the tokens agree, without starting a session; resolves with what it serves. */
  async checkSource(timeoutMs = 5000): Promise<MessageOf<'ready'>> {
    const options = this.#options;
    if ('image' in options) return { t: 'ready', fingerprint: options.image.fingerprint, regions: options.image.regions }; // nothing to reach
    // The source, or else any replica: VMMs are served as long as one answers.
    let last: unknown;
    for (const source of sourcesOf(options)) {
      try {
        return await SourceConnection.probe({ source, token: options.token, timeoutMs });
      } catch (err) {
        last = err;
      }
    }
    throw last;
  }

  /**
   * Checks the source every `intervalMs` from now until close(): logs a
   * warning when it stops answering (VMMs that connect meanwhile wait for it)
   * and says when it answers again.
   */
  watchSource(intervalMs = 30_000): void {
    if (this.#sourceWatch) clearInterval(this.#sourceWatch);
    const options = this.#options;
    if ('image' in options) return; // a local image needs no watching
    let answering = true;
    this.#sourceWatch = setInterval(() => {
      this.checkSource().then(
        () => {
          if (!answering) this.#log.info({ source: String(options.source) }, 'the source answers again');
          answering = true;
        },
        (err) => {
          if (answering)
            this.#log.warn(
              { source: String(options.source), code: asCodedError(err).code, err: (err as Error).message },
              'the source does not answer; VMMs that connect now wait for it',
            );
          answering = false;
        },
      );
    }, intervalMs);
    this.#sourceWatch.unref();
  }

  async close(): Promise<void> {
    if (this.#progressTimer) clearInterval(this.#progressTimer);
    if (this.#sourceWatch) clearInterval(this.#sourceWatch);
    this.#sourceWatch = null;
    const server = this.#server;
    this.#server = null;
    for (const s of [...this.#sessions]) this.#end(s, 'handler closing');
    this.#pending.dropAll();
    const template = this.#template;
    this.#template = null;
    if (template) (await template.catch(() => null))?.close();
    for (const spent of this.#spentTemplates.splice(0)) spent.close();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  async #onVmm(socket: Socket): Promise<void> {
    let handoff: VmmHandoff;
    try {
      if (this.#options.template !== undefined) await this.#offerTemplate(socket);
      handoff = await acceptVmm(socket, this.#pending, this.#options.handshakeTimeoutMs ?? 10_000);
    } catch (err) {
      return this.#refuse((err as { vmmPid?: number }).vmmPid ?? 0, socket, err);
    }
    await this.adopt(handoff);
  }

  /**
   * Serves a VMM whose handshake was received (here, or by the supervisor that
   * hands VMMs to this handler). The handler owns `uffd` from this call on.
   * `takeover`: a handler that died served this VMM before; what is resident
   * is read from the VMM's pagemap, and threads left waiting are woken so
   * their faults come again.
   */
  async adopt(handoff: VmmHandoff): Promise<void> {
    const { pid, socket } = handoff;
    socket.on('error', () => {});
    let guest: GuestRegion[] = [];
    try {
      guest = parseHandshake(handoff.payload);
      const minor = guest.some((g) => g.memfd_offset !== undefined);
      if (this.#options.template !== undefined && (minor || handoff.memfd !== undefined))
        throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, "a template's clone maps the template's memory: it sends no memory file of its own");
      if (minor && handoff.memfd === undefined)
        throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'a region names memfd_offset, but no memory file came with the userfaultfd');
      if (!minor && handoff.memfd !== undefined)
        throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'a memory file came with the userfaultfd, but no region names memfd_offset');
    } catch (err) {
      const poisoned = poisonGuest(handoff.uffd, guest);
      closeSync(handoff.uffd);
      if (handoff.memfd !== undefined) closeSync(handoff.memfd);
      this.#refuse(pid, socket, err, poisoned);
      this.emit('released', { pid, handoff: handoff.handoff });
      return;
    }
    const vmm: VmmSession = {
      pid,
      socket,
      uffd: handoff.uffd,
      ...(handoff.memfd !== undefined ? { memfd: handoff.memfd } : {}),
      fills: [],
      guest,
      session: null,
      ended: false,
      starting: false,
      abort: new AbortController(),
      takeover: handoff.takeover === true,
      ...(handoff.handoff !== undefined ? { handoff: handoff.handoff } : {}),
    };
    this.#sessions.add(vmm);
    // The VMM keeps its socket open while it runs; its hang-up ends the session.
    socket.once('close', () => this.#end(vmm, 'the VMM hung up'));
    socket.resume();
    try {
      await this.#start(vmm);
    } catch (err) {
      if (vmm.ended) return; // the VMM hung up first
      // Refused with its userfaultfd handed over: the VMM still holds its own copy, and a touch would wait forever.
      const poisoned = poisonGuest(vmm.uffd, vmm.guest);
      this.#end(vmm, 'handshake refused');
      this.#refuse(pid, socket, err, poisoned);
    }
  }

  /** Template mode: the template is offered to the VMM first (its memfds), for it to map privately before its handshake. */
  async #offerTemplate(socket: Socket): Promise<void> {
    const options = this.#options;
    if (!this.#template) {
      const opening = Template.open({ ...options, name: options.template! } as Parameters<typeof Template.open>[0], this.#log);
      this.#template = opening;
      opening.then(
        (template) =>
          template.on('failed', (err: PostcopyError) => {
            // Its clones' missing pages cannot come: they are poisoned (see #connect). The next VMM gets a new template.
            for (const vmm of this.#sessions) vmm.session?.fail(err);
            if (this.#template === opening) this.#template = null;
            this.#spentTemplates.push(template);
          }),
        () => {
          if (this.#template === opening) this.#template = null; // the next VMM tries again
        },
      );
    }
    const template = await this.#template;
    const fd = socketFd(socket);
    const offer = template.offer();
    sendFds(fd, offer.payload, offer.fds);
  }

  /** `poisonedBytes`: the guest memory poisoned (SIGBUS on touch) because the VMM handed its userfaultfd over before it was refused. */
  #refuse(pid: number, socket: Socket, err: unknown, poisonedBytes?: number): void {
    const e = asCodedError(err);
    this.#errors.add(e.code);
    const poisoned = poisonedBytes === undefined ? {} : { poisonedBytes };
    this.#log.warn(
      { vmmPid: pid, code: e.code, err: e.message, ...poisoned },
      poisonedBytes ? 'VMM handshake refused; connection closed and its guest memory poisoned (SIGBUS on touch)' : 'VMM handshake refused; connection closed',
    );
    this.emit('rejected', { pid, code: e.code, message: e.message, ...poisoned });
    socket.destroy();
  }

  async #start(vmm: VmmSession): Promise<void> {
    vmm.starting = true;
    try {
      await this.#connect(vmm);
    } finally {
      vmm.starting = false;
      if (vmm.ended) {
        vmm.session?.close(); // the VMM hung up during set-up
        releaseMemory(vmm); // deferred by #end until nothing could use it
      }
    }
  }

  async #connect(vmm: VmmSession): Promise<void> {
    const log = this.#log.child({ vmmPid: vmm.pid });
    const recording = this.#options.recordWorkingSet !== undefined;
    if (this.#template) {
      // A plain VMM would never see the MINOR faults a clone is served by: refused with the reason (and poisoned, by adopt).
      const template = await this.#template;
      const why = template.notClonedBy(vmm.pid, vmm.guest);
      if (why)
        throw new PostcopyError(
          ErrorCode.TEMPLATE_NOT_MAPPED,
          `this handler serves clones of template ${JSON.stringify(template.name)}, and this VMM is not one: ${why}; map the template it is offered (docs/VMM-HANDSHAKE.md, "Templates")`,
        );
    }
    let welcomed = false;
    try {
      const build: EngineFactory = (regions, local) => {
        welcomed = true;
        if (vmm.ended) throw new PostcopyError(ErrorCode.PEER_GONE, 'the VMM hung up during set-up');
        const targets: TargetRegion[] = mapOntoImage(vmm.guest, regions);
        // MINOR mode: the guest's memory file, mapped here too; pages go into its page cache through it.
        vmm.guest.forEach((g, i) => {
          if (g.memfd_offset === undefined) return;
          const fill = mapGuestFile(vmm.memfd!, g, i);
          vmm.fills.push(fill);
          targets[i].fillAddress = fill.address;
        });
        if (vmm.fills.length)
          log.info({ regions: vmm.fills.length }, "MINOR mode: pages go into the guest's memory file; faults are answered with UFFDIO_CONTINUE");
        const engine = new FaultEngine({
          uffd: vmm.uffd,
          sourceRegions: regions.map((r) => ({ pages: r.length / r.pageSize, pageSize: r.pageSize })),
          regions: targets,
          logger: log,
          checksumInstalled: true,
          recordFaults: recording,
          ...(local ? { local } : {}),
        });
        engine.on('memory-event', (e: MemoryEvent) => log.info(e, 'memory event'));
        if (vmm.takeover) {
          let found = 0;
          targets.forEach((t, i) => (found += engine.markResident(i, residentBitmap(vmm.pid, t.base, t.length, t.pageSize))));
          log.info({ residentPages: found }, 'took over a VMM from a handler that died; its resident pages are kept');
        }
        engine.start();
        // Faults the dead handler had read were lost with it: wake their threads so they fault again, to us.
        if (vmm.takeover) for (const t of targets) native.uffdWake(vmm.uffd, t.base, t.length);
        return engine;
      };
      const options = this.#options;
      const replay = recording ? { window: { forward: 0, backward: 0 }, holdBackground: true } : {};
      const image = 'image' in options ? options.image : options.inPlace ? await this.#takeInPlace(vmm, options, log) : null;
      // The guest is already waiting: a source not reachable yet is retried like an outage.
      vmm.session = this.#template
        ? LocalSession.openClone(await this.#template, { logger: log }, build)
        : image || 'image' in options
          ? LocalSession.open({ ...options, image: image ?? (options as LocalSessionOptions).image, ...replay, logger: log }, build)
          : await DestinationSession.open(
              {
                ...options,
                ...replay,
                logger: log,
                retryFirstConnect: true,
                signal: vmm.abort.signal,
                // Huge-page guest regions: the source sends whole huge pages.
                pageSizesFor: (regions) => guestPageSizes(vmm.guest, regions),
              },
              build,
            );
      if (recording) this.#startBackgroundWhenQuiet(vmm);
    } catch (err) {
      // The handshake does not fit the image, or this source cannot serve it: refused.
      if (welcomed || vmm.ended || asCodedError(err).code === ErrorCode.UNSUPPORTED) throw err;
      // The source stayed out of reach past the give-up time: the guest must not wait forever on memory that cannot come.
      const poisoned = poisonGuest(vmm.uffd, vmm.guest);
      const e = err as PostcopyError;
      log.error({ code: e.code, err: e.message, poisonedBytes: poisoned }, 'the source cannot be reached: every missing guest page poisoned (SIGBUS on touch)');
      this.#end(vmm, 'the source cannot be reached');
      return;
    }
    const session = vmm.session;
    if (vmm.ended) return; // the VMM hung up during set-up: #start closes what is left
    this.emit('session-start', { pid: vmm.pid });
    session.on('paused', (err: PostcopyError) => this.#errors.add(err.code));
    session.on('failed', (err: PostcopyError) => {
      this.#errors.add(err.code);
      if (vmm.ended) return;
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
        async () => {
          const { check, pagesSent } = await checkAgainstSource(session, this.#transfer);
          vmm.installedCheck = check;
          if (check.result === 'mismatch') {
            this.#errors.add(ErrorCode.DIGEST_MISMATCH);
            session.release();
            log.error(
              { code: ErrorCode.DIGEST_MISMATCH, ...check },
              'every guest page is resident, but pages installed in the guest differ from the source image',
            );
          } else if (check.result === 'match') {
            session.verified({ checkedPages: check.checkedPages });
            log.info({ sourcePagesSent: pagesSent, checkedPages: check.checkedPages }, 'every guest page is resident and matches the source image');
          } else {
            session.release();
            const why = {
              'older-source': 'the source is too old to check them',
              'too-fragmented': 'the pages left out are too fragmented to list (over 100000 ranges a region)',
              'nothing-installed': 'no page was installed from the source',
            }[check.unchecked ?? 'nothing-installed'];
            log.warn({ sourcePagesSent: pagesSent, unchecked: check.unchecked }, `every guest page is resident; the installed pages were not checked: ${why}`);
          }
          this.emit('installed-check', { vmmPid: vmm.pid, ...check });
        },
        () => {}, // failures are logged by the session and handled above
      )
      .catch((err) => {
        if (vmm.ended) log.info({ err: (err as Error).message }, 'the VMM left before its pages were checked against the source');
        else log.warn({ code: asCodedError(err).code, err: (err as Error).message }, 'finishing with the source failed');
      });
  }

  /** In place: the source's memory (its fds) as this VMM session's image; null when the source does not offer it. */
  async #takeInPlace(vmm: VmmSession, options: DestinationSessionOptions, log: Logger): Promise<Image | null> {
    const taken = await SourceConnection.takeMemory({ source: options.source, ...(options.token ? { token: options.token } : {}) }).catch((err) => {
      log.warn({ code: asCodedError(err).code, err: (err as Error).message }, 'taking the source memory in place failed; copying instead');
      return null;
    });
    if (!taken) {
      log.info('the source does not offer its memory in place (TCP, or an image that is not shared memory): copying');
      return null;
    }
    try {
      const image = Image.open(taken.fds.map((fd, i) => ({ fd, name: taken.regions[i].name })));
      if (image.fingerprint !== taken.fingerprint) {
        image.close();
        throw new PostcopyError(ErrorCode.IMAGE_MISMATCH, 'the memory the source handed over is not the image it serves');
      }
      vmm.taken = { image, fds: taken.fds };
      log.info({ regions: taken.fds.length, bytes: image.totalBytes }, "took the source's memory in place: faults are served from it here");
      return image;
    } catch (err) {
      for (const fd of taken.fds) closeSync(fd);
      throw err;
    }
  }

  /** While recording: the background starts once the guest's faults go quiet (or it never faulted for a while). */
  #startBackgroundWhenQuiet(vmm: VmmSession): void {
    let faults = -1;
    let quietSince = Date.now();
    vmm.quietWatch = setInterval(() => {
      const session = vmm.session;
      if (!session || vmm.ended) return clearInterval(vmm.quietWatch);
      const now = session.engine.stats().faults;
      if (now !== faults) {
        faults = now;
        quietSince = Date.now();
        return;
      }
      if (Date.now() - quietSince >= (faults > 0 ? RECORD_QUIET_MS : 5 * RECORD_QUIET_MS)) {
        clearInterval(vmm.quietWatch);
        this.#log.info({ vmmPid: vmm.pid, faults }, 'the guest stopped faulting: working set recorded so far; background started');
        session.startBackground();
      }
    }, RECORD_QUIET_MS / 4);
    vmm.quietWatch.unref();
  }

  /** Writes the session's working set (recordWorkingSet) once its engine has stopped. */
  #writeWorkingSet(vmm: VmmSession, session: PageSession): void {
    const path = this.#options.recordWorkingSet;
    if (path === undefined) return;
    try {
      const set = { ...layoutOf(session.regions), fingerprint: session.fingerprint, entries: session.engine.faultedPages() };
      writeWorkingSet(path, set);
      this.#log.info({ vmmPid: vmm.pid, pages: pagesIn(set), file: path }, 'working set recorded');
    } catch (err) {
      this.#log.error({ vmmPid: vmm.pid, err: (err as Error).message, file: path }, 'writing the working set failed');
    }
  }

  #end(vmm: VmmSession, reason: string): void {
    if (vmm.ended) return;
    vmm.ended = true;
    vmm.abort.abort();
    if (vmm.quietWatch) clearInterval(vmm.quietWatch);
    this.#sessions.delete(vmm);
    // Stop first: the final figures are read once every engine thread has finished.
    const session = vmm.session;
    session?.close();
    if (session) this.#writeWorkingSet(vmm, session);
    const stats = session?.stats();
    if (!vmm.starting) releaseMemory(vmm); // else #start does it when it returns
    vmm.socket.destroy();
    if (session && stats) {
      addTotals(this.#retired, stats, session.engine.latencyBuckets(LATENCY_BOUNDS_NS));
      const summary: VmmSessionSummary = {
        ...summarize(stats, this.#transfer, session.engine.regions),
        vmmPid: vmm.pid,
        removedPages: stats.removedPages,
        zeroFilledAfterRemove: stats.zeroFilledAfterRemove,
        poisonedPages: stats.poisonedPages,
        complete: stats.residentPages === stats.totalPages && stats.poisonedPages === 0,
        installedCheck: vmm.installedCheck ?? null,
        recovery: session.status(),
      };
      this.#log.info({ reason, ...summary }, 'VMM session ended');
      this.emit('session-end', summary);
    } else {
      this.#log.info({ vmmPid: vmm.pid, reason }, 'VMM session ended');
    }
    this.emit('released', { pid: vmm.pid, handoff: vmm.handoff });
  }
}

/** Closes what the VMM handed over (its userfaultfd, its memory file) and unmaps our view of its memory, once no engine thread can use them. */
function releaseMemory(vmm: VmmSession): void {
  for (const m of vmm.fills) m.unmap();
  vmm.fills = [];
  if (vmm.taken) {
    vmm.taken.image.close();
    for (const fd of vmm.taken.fds) closeSync(fd);
    vmm.taken = undefined;
  }
  closeSync(vmm.uffd);
  if (vmm.memfd !== undefined) closeSync(vmm.memfd);
}

/** Per image region, the largest page size a guest region on it uses (the image's own where none is larger). */
function guestPageSizes(guest: GuestRegion[], image: RegionInfo[]): number[] {
  const sizes = image.map((r) => r.pageSize);
  let start = 0;
  for (const [i, r] of image.entries()) {
    for (const g of guest) if (g.offset >= start && g.offset < start + r.length) sizes[i] = Math.max(sizes[i], g.page_size ?? 4096);
    if (r.length % sizes[i])
      throw new PostcopyError(
        ErrorCode.UNSUPPORTED,
        `image region ${i} (${r.length} bytes) is not whole ${sizes[i]}-byte pages: a guest cannot map it in huge pages`,
      );
    start += r.length;
  }
  return sizes;
}

/** A guest region's part of its memory file, mapped shared in this process (MINOR mode). */
function mapGuestFile(memfd: number, g: GuestRegion, i: number): Mapping {
  const size = fstatSync(memfd).size;
  const offset = g.memfd_offset!;
  if (offset % (g.page_size ?? 4096) || offset + g.size > size)
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i}: memfd_offset ${offset} + size ${g.size} does not fit the ${size}-byte memory file`);
  return mapFile(memfd, g.size, { offset, shared: true });
}

/**
 * Poisons every guest region whole (the source was never reached, or the VMM
 * was refused after it handed its userfaultfd over); returns the bytes
 * poisoned. Pages already present keep their contents.
 */
function poisonGuest(uffd: number, guest: readonly GuestRegion[]): number {
  let bytes = 0;
  for (const g of guest) {
    const pageSize = g.page_size ?? 4096;
    const end = g.base_host_virt_addr + g.size;
    let at = g.base_host_virt_addr;
    for (let tries = 0; at < end && tries < 1000; tries++) {
      try {
        const r = native.uffdPoison(uffd, at, end - at, 0);
        bytes += r.bytes;
        if (r.code === null) break;
        at += r.bytes + (r.code === 'EEXIST' ? pageSize : 0); // a page already present keeps its contents
      } catch {
        break; // a region the VMM no longer has: nothing to protect there
      }
    }
  }
  return bytes;
}

/**
 * Places each guest region on the source image: `offset` counts from the start
 * of the image (the source's regions laid end to end). A region must fall
 * inside one source region, be page-aligned, and overlap no other region.
 */
export function mapOntoImage(guest: GuestRegion[], image: RegionInfo[]): Required<Omit<TargetRegion, 'fillAddress'>>[] {
  const targets = guest.map((g, i) => {
    const pageSize = g.page_size ?? 4096;
    if (g.base_host_virt_addr % pageSize || g.size % pageSize || g.offset % pageSize) {
      throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} is not aligned to its ${pageSize}-byte pages`);
    }
    let start = 0;
    for (const r of image) {
      if (g.offset >= start && g.offset + g.size <= start + r.length) {
        // A guest page is one or more whole image pages (a 2 MiB huge page from a 4 KiB-page image).
        if (pageSize < r.pageSize)
          throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} uses ${pageSize}-byte pages, smaller than the image's ${r.pageSize}`);
        return { base: g.base_host_virt_addr, length: g.size, pageSize, sourceRegion: r.id, sourcePage: (g.offset - start) / r.pageSize };
      }
      start += r.length;
    }
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} [${g.offset}, ${g.offset + g.size}) falls outside the ${start}-byte image`);
  });
  if (hasOverlap(guest.map((g) => [g.base_host_virt_addr, g.base_host_virt_addr + g.size])))
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'guest regions overlap in memory');
  if (hasOverlap(guest.map((g) => [g.offset, g.offset + g.size])))
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'guest regions overlap in the image');
  return targets;
}
