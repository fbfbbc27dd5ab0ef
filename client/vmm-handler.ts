// The page-fault handler a VMM hands its guest memory to (Firecracker style):
// listens on a unix socket; each VMM connects and sends, in one message, a JSON
// array describing its memory regions with its userfaultfd attached
// (SCM_RIGHTS). Each VMM is a VmmSession (client/vmm-session.ts): its own page
// session, opened by client/open-session.ts over its guest memory, with the
// source (pausing and resuming when the source is lost), a local image, the
// source's memory taken in place, or a template. Its hang-up ends the session
// and frees everything; the VMM's memory is never ours to unmap. Should the
// source stay out of reach past the give-up time, the pages still missing are
// poisoned: the guest gets SIGBUS instead of hanging or reading zeros.
import { EventEmitter } from 'node:events';
import { closeSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { ErrorCode, PostcopyError, asCodedError } from '../lib/errors.js';
import { parseHandshake, type GuestRegion } from '../lib/vmm-handshake.js';
import { sendFds, socketFd } from '../lib/fd-passing.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { listenOwnerOnly } from '../lib/unix-socket.js';
import type { MessageOf } from '../lib/protocol.js';
import { Tally } from '../lib/metrics.js';
import { transferOptions, type TransferOptions } from '../lib/transfer.js';
import { SourceConnection } from './source-connection.js';
import { DESTINATION_STATES, sourcesOf, type DestinationSessionOptions } from './session.js';
import { LOCAL_STATES, type LocalSessionOptions } from './local-session.js';
import { STORE_STATES, readStoreManifest, storeTransferOptions, type StoreSessionOptions } from './store-session.js';
import { Template } from './template.js';
import { poisonGuest } from './guest-memory.js';
import { LATENCY_BOUNDS_NS, addTotals, emptyTotals, type HandlerFigures, type HandlerTotals } from './handler-totals.js';
import { PendingHandshakes, acceptVmm, type VmmHandoff } from './vmm-accept.js';
import { VmmSession, type VmmEnded } from './vmm-session.js';

export { parseHandshake, type GuestRegion };
export { mapOntoImage } from './guest-memory.js';
export { MAX_PENDING_HANDSHAKES, PendingHandshakes, acceptVmm, receiveHandshake, type VmmHandoff } from './vmm-accept.js';
export type { HandlerFigures, HandlerTotals } from './handler-totals.js';
export { RECORD_QUIET_MS, type VmmSessionSummary } from './vmm-session.js';

/** The states a VMM's page session can be in, whichever kind it is (a source's, an image's, a store's); connecting: still being opened. */
const PAGE_SESSION_STATES = [...new Set<string>([...DESTINATION_STATES, ...LOCAL_STATES, ...STORE_STATES])];

/** Where each VMM's pages come from: a source (`source`), a local image (`image`, shared by every VMM) or an image in a store (`storeImage`). */
export type VmmHandlerOptions = (DestinationSessionOptions | LocalSessionOptions | StoreSessionOptions) & {
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
    this.#transfer = 'storeImage' in options ? storeTransferOptions(options) : transferOptions(options);
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
      if (!session || vmm.gone) continue;
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

  /** What this handler has done so far, over every VMM session it served: for metrics. Every state is in `sessions`, 0 when none is in it. */
  figures(): HandlerFigures {
    const totals = { ...this.#retired, latencyBuckets: [...this.#retired.latencyBuckets] };
    const sessions = Object.fromEntries(PAGE_SESSION_STATES.map((state) => [state, 0]));
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
    if ('storeImage' in options) {
      // The store answers and holds the image: its manifest.
      const m = await readStoreManifest(options);
      return {
        t: 'ready',
        fingerprint: m.fingerprint,
        regions: m.regions.map(({ id, name, length, pageSize, contentLength }) => ({ id, name, length, pageSize, contentLength })),
      };
    }
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
    if ('image' in options || 'storeImage' in options) return; // a local image needs no watching; a store session pauses and resumes by itself
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
    for (const s of [...this.#sessions]) s.end('handler closing');
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
    const vmm = new VmmSession(
      { pid, socket, uffd: handoff.uffd, ...(handoff.memfd !== undefined ? { memfd: handoff.memfd } : {}), guest, takeover: handoff.takeover === true },
      { options: this.#options, transfer: this.#transfer, template: () => this.#template, errors: this.#errors, log: this.#log },
    );
    this.#sessions.add(vmm);
    vmm.on('started', () => this.emit('session-start', { pid }));
    vmm.on('installed-check', (check) => this.emit('installed-check', check));
    vmm.once('ended', (ended: VmmEnded | null, reason: string) => {
      this.#sessions.delete(vmm);
      if (ended) {
        addTotals(this.#retired, ended.stats, ended.latencyBuckets);
        this.#log.info({ reason, ...ended.report }, 'VMM session ended');
        this.emit('session-end', ended.report);
      } else {
        this.#log.info({ vmmPid: pid, reason }, 'VMM session ended');
      }
      this.emit('released', { pid, handoff: handoff.handoff });
    });
    // The VMM keeps its socket open while it runs; its hang-up ends the session.
    socket.once('close', () => vmm.end('the VMM hung up'));
    socket.resume();
    try {
      await vmm.start();
    } catch (err) {
      // Refused with its userfaultfd handed over (and its guest poisoned: a touch would have waited forever).
      this.#refuse(pid, socket, err, (err as { poisonedBytes?: number }).poisonedBytes);
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
            // Its clones' missing pages cannot come: they are poisoned (client/vmm-session.ts). The next VMM gets a new template.
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
}
