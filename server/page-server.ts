// The source page server: listens on a unix socket or TCP, keeps the table of
// sessions (one per destination, over a shared, read-only image) and the
// figures of what it served. Each control connection is one conversation
// (server/control.ts); release-as-sent (server/release.ts) and a live source
// (server/live-serving.ts) are parts it hands to them.
import { closeSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { type Address, formatAddress, isLocalOnly, parseAddress } from '../lib/address.js';
import { ErrorCode, PostcopyError, asCodedError } from '../lib/errors.js';
import { sendFds } from '../lib/fd-passing.js';
import type { Image } from '../lib/image.js';
import { MAX_RUN_BYTES } from '../lib/limits.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import {
  DEFAULT_HEARTBEAT,
  DEFAULT_MAX_FRAME,
  FrameReader,
  encodeFrame,
  sendErrorAndClose,
  takeSocket,
  type Heartbeat,
  type MessageOf,
} from '../lib/protocol.js';
import { listenOwnerOnly } from '../lib/unix-socket.js';
import { validateInteger } from '../lib/validate.js';
import { Admission } from './admission.js';
import { ControlConversation, type ControlHost } from './control.js';
import { ServedFigures, type ServerFigures } from './figures.js';
import type { LiveMigration } from './live.js';
import { LiveServing } from './live-serving.js';
import { ReleaseAsSent, defaultReleaseBudgetBytes } from './release.js';
import { DEFAULT_RESUME_GRACE_MS, SourceSession } from './session.js';

export { defaultReleaseBudgetBytes } from './release.js';
export type { ServerFigures } from './figures.js';
export { MAX_UNPROVEN_CONNECTIONS, MAX_UNPROVEN_PER_PEER } from './admission.js';

/** How many ended sessions are remembered, so that a data channel attaching to one is told why it is gone. */
const ENDED_SESSIONS_KEPT = 1024;

export interface PageServerOptions {
  image: Image;
  /** Destinations must prove they hold this token (required beyond loopback). */
  token?: string;
  logger?: Logger;
  /** Largest control frame accepted (default 4 MiB). */
  maxFrame?: number;
  /** A connection that has not finished its handshake by then is dropped (default 10 s). */
  handshakeTimeoutMs?: number;
  /** A connection that has not authenticated by then (token, or a data channel's ticket) is closed (default 5 s; server/admission.ts). */
  authTimeoutMs?: number;
  /** Control-channel liveness (default: a heartbeat each second, silent after 5 s). */
  heartbeat?: Heartbeat;
  /** How long a session whose destination went away waits for it to resume (default 60 s). */
  resumeGraceMs?: number;
  /**
   * Data channels over TCP in the clear. Only for measuring what encryption
   * costs on a trusted link (the bench); destinations refuse it unless they
   * say acceptPlaintextTcp.
   */
  plaintextTcp?: boolean;
  /**
   * Free the image's memory as the destination installs it (never merely
   * sends it): a localhost move then never holds two copies. The image must
   * be shared memory this source may write (tmpfs, a memfd); one destination
   * at a time; its digests are computed before the first page goes.
   */
  releaseAsSent?: boolean;
  /**
   * Release as sent: the most bytes of pages sent and not yet confirmed
   * installed by the destination (default defaultReleaseBudgetBytes()): the
   * memory both sides hold together stays within the image plus this (plus
   * the requested pages in flight), whatever the machine's speed.
   */
  releaseBudgetBytes?: number;
  /**
   * A live source: the image is a running workload's memory (server/live.ts)
   * and this migration moves it to one destination, with precopy rounds
   * while it runs where the destination can take them.
   */
  live?: LiveMigration;
}

export class PageServer {
  readonly #image: Image;
  /** The image's content digest (Image.contentDigest), taken before listening; null for a live image. */
  #content: string | null = null;
  /** release-as-sent: the image is freed as its one destination installs it. */
  readonly #release: ReleaseAsSent | null;
  /** Settles once a release-as-sent source's destination holds every page, was answered `done` and said bye (never, otherwise). */
  readonly #consumed: Promise<void>;
  readonly #token: string | undefined;
  readonly #live: LiveServing | null;
  readonly #log: Logger;
  readonly #maxFrame: number;
  readonly #handshakeTimeoutMs: number;
  readonly #heartbeat: Heartbeat;
  readonly #resumeGraceMs: number;
  readonly #plaintextTcp: boolean;
  readonly #sessions = new Map<string, SourceSession>();
  readonly #sockets = new Set<Socket>();
  /** Connections not yet authenticated: deadlines, limits, the oldest closed to make room (server/admission.ts). */
  readonly #unproven: Admission;
  /** Sessions that ended with their control channel before their data channels attached: id -> why (the newest ENDED_SESSIONS_KEPT). */
  readonly #ended = new Map<string, string>();
  /** Each session's current control connection (a resume replaces it). */
  readonly #controls = new Map<string, Socket>();
  #server: Server | null = null;
  #address: Address | null = null;
  readonly #figures = new ServedFigures();
  /** What each control conversation needs of this server. */
  readonly #host: ControlHost;

  constructor(options: PageServerOptions) {
    this.#image = options.image;
    this.#token = options.token;
    this.#log = options.logger ?? silentLogger;
    this.#live = options.live ? new LiveServing(options.live, this.#log) : null;
    this.#maxFrame = options.maxFrame ?? DEFAULT_MAX_FRAME;
    this.#handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.#heartbeat = options.heartbeat ?? DEFAULT_HEARTBEAT;
    this.#resumeGraceMs = options.resumeGraceMs ?? DEFAULT_RESUME_GRACE_MS;
    this.#plaintextTcp = options.plaintextTcp === true;
    this.#unproven = new Admission({
      logger: this.#log,
      ...(options.authTimeoutMs !== undefined ? { authTimeoutMs: options.authTimeoutMs } : {}),
      count: (code) => this.#figures.error(code),
    });
    const budget = validateInteger(options.releaseBudgetBytes ?? defaultReleaseBudgetBytes(this.#image.totalBytes), 'releaseBudgetBytes', MAX_RUN_BYTES);
    this.#release = options.releaseAsSent === true ? new ReleaseAsSent(this.#image, budget, this.#log) : null;
    this.#consumed = this.#release ? this.#release.whenConsumed() : new Promise<void>(() => {});
    this.#host = {
      image: this.#image,
      token: this.#token,
      content: () => this.#content,
      maxFrame: this.#maxFrame,
      handshakeTimeoutMs: this.#handshakeTimeoutMs,
      heartbeat: this.#heartbeat,
      plaintextTcp: this.#plaintextTcp,
      release: this.#release,
      live: this.#live,
      log: this.#log,
      proven: (socket) => this.#unproven.proven(socket),
      sessionFor: (resume) => this.#sessionFor(resume),
      controlOpened: (session, socket, saidBye, answered) => this.#controlOpened(session, socket, saidBye, answered),
      error: (code) => this.#figures.error(code),
    };
  }

  /** Pages of the image freed so far (release-as-sent), by this process and any before it. */
  get releasedPages(): number {
    return this.#image.releasedPages;
  }

  /**
   * Release-as-sent: resolves once the one destination holds every page (all
   * freed here), had its digest and said bye: the image has moved, and the
   * source has nothing left to serve.
   */
  whenConsumed(): Promise<void> {
    return this.#consumed;
  }

  get sessions(): ReadonlyMap<string, SourceSession> {
    return this.#sessions;
  }

  /** What this server has done so far, over every session it served: for metrics. */
  figures(): ServerFigures {
    return this.#figures.of(this.#sessions.values());
  }

  /** Drops a session from the table; its figures stay in the totals. */
  #forget(id: string): void {
    const session = this.#sessions.get(id);
    if (!session) return;
    this.#sessions.delete(id);
    this.#figures.retire(session);
  }

  get address(): Address | null {
    return this.#address;
  }

  /**
   * Listens on `address` (unix:PATH, or tcp:HOST:PORT with port 0 for any).
   * Beyond loopback only with a token. Unix sockets are created 0600.
   */
  async listen(address: string | Address): Promise<Address> {
    const a = typeof address === 'string' ? parseAddress(address) : address;
    if (a.kind === 'tcp' && !this.#token) {
      const who = isLocalOnly(a) ? 'any user of this host' : 'anyone on the network';
      throw new PostcopyError(
        ErrorCode.AUTH_REQUIRED,
        `refusing to listen on ${formatAddress(a)} without a token: ${who} could read the image (unix sockets need none: they are created 0600)`,
      );
    }
    // Once pages are freed the image cannot be read back: its digests and checksums are taken now.
    const began = Date.now();
    if (this.#release) await this.#release.begin();
    // What every welcome carries: a resuming destination checks that this is the image it was restoring, every byte of it.
    this.#content = (await this.#image.contentDigest()) ?? null;
    if (this.#content)
      this.#log.info({ content: this.#content.slice(0, 16), ms: Date.now() - began }, 'image digested (a file keeps it beside it for the next start)');
    const server = createServer({ noDelay: true }, (socket) => void this.#onConnection(socket));
    if (a.kind === 'unix') {
      await listenOwnerOnly(server, a.path);
    } else {
      await new Promise<void>((resolve, reject) => {
        server.once('error', (err: NodeJS.ErrnoException) =>
          reject(
            Object.assign(
              new PostcopyError(
                err.code === 'EADDRINUSE' ? ErrorCode.ADDRESS_IN_USE : ErrorCode.INVALID_ADDRESS,
                err.code === 'EADDRINUSE' ? `another process is listening on ${formatAddress(a)}` : `cannot listen on ${formatAddress(a)}: ${err.message}`,
              ),
              { errno: err.errno, syscall: err.syscall },
            ),
          ),
        );
        server.listen(a.port, a.host, resolve);
      });
    }
    const bound = server.address();
    this.#address = a.kind === 'tcp' && bound && typeof bound === 'object' ? { kind: 'tcp', host: a.host, port: bound.port } : a;
    this.#server = server;
    this.#log.info(
      { listen: formatAddress(this.#address), auth: this.#token ? 'token' : 'none', regions: this.#image.regions.length, bytes: this.#image.totalBytes },
      'serving',
    );
    return this.#address;
  }

  /** Stops listening, ends every session and closes every connection. */
  async close(): Promise<void> {
    const server = this.#server;
    this.#server = null;
    for (const s of this.#sessions.values()) s.close('server closing');
    for (const id of [...this.#sessions.keys()]) this.#forget(id);
    this.#controls.clear();
    this.#unproven.close();
    for (const socket of this.#sockets) socket.destroy();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  async #onConnection(socket: Socket): Promise<void> {
    this.#sockets.add(socket);
    socket.once('close', () => this.#sockets.delete(socket));
    socket.on('error', () => {});
    // Connections that have not proven anything yet are bounded in time and number; a flood of them never starves the rest.
    this.#unproven.admit(socket);
    const reader = new FrameReader(socket, this.#maxFrame);
    try {
      const first = await reader.next(['hello', 'attach'], this.#handshakeTimeoutMs);
      if (first.t === 'attach') await this.#onAttach(socket, reader, first);
      else await new ControlConversation(this.#host, socket, reader, first).run();
    } catch (err) {
      const e = asCodedError(err);
      if (this.#server === null) {
        socket.destroy(); // shutting down: whatever was under way ends with the server, quietly
        return;
      }
      if (this.#unproven.pending(socket)) {
        this.#unproven.failed(socket, e.code); // before it authenticated: counted in a summary line, not logged alone
      } else if (e.code !== ErrorCode.PEER_GONE) {
        this.#figures.error(e.code);
        this.#log.warn({ code: e.code, err: e.message, remote: socket.remoteAddress ?? 'unix' }, 'connection ended');
      }
      sendErrorAndClose(socket, e.code, e.message);
    }
  }

  async #onAttach(socket: Socket, reader: FrameReader, msg: MessageOf<'attach'>): Promise<void> {
    const session = typeof msg.session === 'string' ? this.#sessions.get(msg.session) : undefined;
    const ended = typeof msg.session === 'string' ? this.#ended.get(msg.session) : undefined;
    if (!session && ended) throw new PostcopyError(ErrorCode.PEER_GONE, `this data channel's session has ended: ${ended}`);
    if (!session) throw new PostcopyError(ErrorCode.AUTH_FAILED, 'no such session');
    if (msg.channel !== 'urgent' && msg.channel !== 'bulk' && msg.channel !== 'memory')
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'unknown channel');
    if (msg.channel === 'memory' && !session.memoryOffered)
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'this source did not offer its memory in place (TCP, or an image that is not shared memory)');
    session.verifyAttach(msg.channel, msg.ticket);
    const ticket = msg.ticket as Uint8Array;
    this.#unproven.proven(socket);
    // The destination sends nothing more until it reads this reply, so once the
    // reply is written no byte can be left behind in JS when native code takes over.
    if (reader.detach().length > 0) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'bytes arrived on a data channel before it was attached');
    // The memory channel's answer is the fds themselves (no `attached`: its bytes could reach the destination's JS ahead of them).
    if (msg.channel === 'memory') return this.#handOverMemory(session, takeSocket(socket));
    await new Promise<void>((resolve, reject) => socket.write(encodeFrame({ t: 'attached' }), (err) => (err ? reject(err) : resolve())));
    session.adoptChannel(msg.channel, takeSocket(socket), ticket);
  }

  /** In place: the image's shared-memory fds go to the destination (SCM_RIGHTS) with the regions they hold; nothing is copied. */
  #handOverMemory(session: SourceSession, fd: number): void {
    try {
      const fds = this.#image.memoryFds()!;
      const regions = this.#image.regions.map((r) => ({ id: r.id, length: r.length }));
      sendFds(fd, Buffer.from(JSON.stringify({ regions })), fds);
      this.#log.info({ session: session.id, regions: regions.length, bytes: this.#image.totalBytes }, 'the destination took the image in place (its fds)');
    } finally {
      closeSync(fd);
    }
  }

  /**
   * `socket` is `session`'s control channel now. When it closes (unless a
   * resume replaced it): a live source before its switchover ends the
   * migration and the session; a destination that said bye is done; any other
   * loss pauses the session for the resume grace.
   */
  #controlOpened(session: SourceSession, socket: Socket, saidBye: () => boolean, answered: () => boolean): void {
    this.#controls.set(session.id, socket);
    socket.once('close', () => {
      if (this.#controls.get(session.id) !== socket) return; // replaced by a resume
      this.#controls.delete(session.id);
      if (this.#live?.controlLost()) session.close('the destination left before the switchover');
      else if (saidBye()) session.close('the destination said bye');
      else
        session.connectionLost('control channel closed', this.#resumeGraceMs, () => {
          this.#forget(session.id);
          // A live destination sent its digest, then lost, and not back within the grace: it had every page; the workload has moved.
          if (answered()) this.#live?.answered();
        });
      if (session.state === 'closed') {
        if (!saidBye()) this.#remember(session.id, 'its control channel closed (cut, or the destination left) before the transfer started');
        this.#forget(session.id);
      }
    });
  }

  /** Keeps why a session ended, for a data channel that still attaches to it (the newest ENDED_SESSIONS_KEPT). */
  #remember(id: string, why: string): void {
    this.#ended.set(id, why);
    if (this.#ended.size > ENDED_SESSIONS_KEPT) this.#ended.delete(this.#ended.keys().next().value as string);
  }

  /**
   * The session this control connection drives: the paused one it resumes, or
   * a new one. A destination may resume a session this process never saw (the
   * source restarted): it presents its bitmap of held pages all the same, so a
   * new session serves exactly what is missing.
   */
  #sessionFor(resume: unknown): SourceSession {
    if (resume !== undefined && typeof resume !== 'string') throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'auth.resume must be a session id');
    const known = resume ? this.#sessions.get(resume) : undefined;
    if (known && !known.resumable) {
      // Its old connection has not been seen to fail yet (a half-open link): the destination knows better.
      const old = this.#controls.get(known.id);
      this.#controls.delete(known.id);
      old?.destroy();
      known.connectionLost('the destination came back on a new connection', this.#resumeGraceMs, () => this.#forget(known.id));
      if (known.state === 'closed') this.#forget(known.id);
    }
    if (known?.resumable) {
      known.resume();
      return known;
    }
    const active = [...this.#sessions.values()].some((s) => s.state !== 'closed');
    this.#live?.admit(resume, active);
    this.#release?.admit(resume, active);
    const session = new SourceSession(this.#image, this.#log, (err) => {
      this.#figures.error(err.code);
      this.#log.warn({ session: session.id, code: err.code, err: err.message }, 'session failed');
      const control = this.#controls.get(session.id);
      if (control) sendErrorAndClose(control, err.code, err.message);
    });
    if (resume)
      this.#log.info(
        { session: session.id, resumes: resume, known: known ? known.state : false },
        'a destination resumes a session this source does not hold; serving what its bitmap lacks',
      );
    this.#sessions.set(session.id, session);
    return session;
  }
}
