// The source page server: listens on a unix socket or TCP, authenticates each
// destination by token challenge-response, and runs one session per
// destination over a shared, read-only image.
import { closeSync } from 'node:fs';
import { sendFds } from '../lib/fd-passing.js';
import { createServer, type Server, type Socket } from 'node:net';
import { ErrorCode, PostcopyError, asCodedError } from '../lib/errors.js';
import { type Address, formatAddress, isLocalOnly, parseAddress } from '../lib/address.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import {
  DEFAULT_HEARTBEAT,
  DEFAULT_MAX_FRAME,
  FrameReader,
  checkHave,
  checkHaveChunk,
  checkPrefetch,
  checkPageSizes,
  checkOptions,
  checkVerify,
  PROTOCOL_VERSION,
  SOFTWARE,
  dataChannelKeys,
  encodeFrame,
  keepAlive,
  newNonce,
  proofMatches,
  proveToken,
  send,
  sendErrorAndClose,
  takeSocket,
  type Heartbeat,
  type MessageOf,
  type RegionInfo,
} from '../lib/protocol.js';
import { MAX_RUN_BYTES } from '../lib/limits.js';
import { validateInteger } from '../lib/validate.js';
import { listenOwnerOnly } from '../lib/unix-socket.js';
import { Tally } from '../lib/metrics.js';
import { DEFAULT_RESUME_GRACE_MS, SourceSession } from './session.js';
import type { Image } from '../lib/image.js';
import type { LiveMigration } from './live.js';
import { Admission } from './admission.js';

/**
 * Release as sent, by default: at most 1/64 of the image (and at least 16
 * MiB) of pages sent and not yet confirmed installed. The destination reports
 * every 25 ms per GiB of image, so that still lets about 640 MiB/s through
 * whatever the image's size, and a move of 1 GiB or more peaks at 1.016x the
 * image, plus the two processes' own memory.
 */
export function defaultReleaseBudgetBytes(imageBytes: number): number {
  return Math.max(16 << 20, Math.ceil(imageBytes / 64 / MAX_RUN_BYTES) * MAX_RUN_BYTES);
}

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

/** The running totals a server keeps over its sessions (lib/native.ts SourceStats). */
const SERVED_TOTALS = ['requests', 'pagesRequested', 'pagesResent', 'pagesPrefaulted', 'pagesBackground', 'pagesPrefetched', 'zeroPages', 'bytesSent'] as const;

/** PageServer.figures(): sessions by state now, totals since start, errors by code. */
export type ServerFigures = { sessions: Record<string, number>; errors: [string, number][] } & Record<(typeof SERVED_TOTALS)[number], number>;

export class PageServer {
  readonly #image: Image;
  /** release-as-sent: the image is freed as its one destination installs it (Image.release). */
  readonly #release: boolean;
  readonly #releaseBudgetBytes: number;
  /** The image's content digest (Image.contentDigest), taken before listening; null for a live image. */
  #content: string | null = null;
  /** Settles once a release-as-sent source's destination holds every page, was answered `done` and said bye. */
  readonly #consumed: { promise: Promise<void>; resolve: () => void };
  readonly #token: string | undefined;
  readonly #live: LiveMigration | null;
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
  /** Errors by code, for the life of the server. */
  readonly #errors = new Tally();
  /** The figures of sessions already forgotten, summed. */
  readonly #retired: Record<(typeof SERVED_TOTALS)[number], number> = Object.fromEntries(SERVED_TOTALS.map((k) => [k, 0])) as Record<
    (typeof SERVED_TOTALS)[number],
    number
  >;

  constructor(options: PageServerOptions) {
    this.#image = options.image;
    this.#token = options.token;
    this.#live = options.live ?? null;
    this.#log = options.logger ?? silentLogger;
    this.#maxFrame = options.maxFrame ?? DEFAULT_MAX_FRAME;
    this.#handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.#heartbeat = options.heartbeat ?? DEFAULT_HEARTBEAT;
    this.#resumeGraceMs = options.resumeGraceMs ?? DEFAULT_RESUME_GRACE_MS;
    this.#plaintextTcp = options.plaintextTcp === true;
    this.#unproven = new Admission({
      logger: this.#log,
      ...(options.authTimeoutMs !== undefined ? { authTimeoutMs: options.authTimeoutMs } : {}),
      count: (code) => this.#errors.add(code),
    });
    this.#release = options.releaseAsSent === true;
    this.#releaseBudgetBytes = validateInteger(
      options.releaseBudgetBytes ?? defaultReleaseBudgetBytes(this.#image.totalBytes),
      'releaseBudgetBytes',
      MAX_RUN_BYTES,
    );
    if (this.#release && !this.#image.memoryFds())
      throw new PostcopyError(
        ErrorCode.IMAGE_INVALID,
        'release-as-sent frees the image as it is installed: the image must be shared memory this source may write (tmpfs, a memfd)',
      );
    let resolve!: () => void;
    this.#consumed = { promise: new Promise<void>((r) => (resolve = r)), resolve };
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
    return this.#consumed.promise;
  }

  #totalPages(): number {
    return this.#image.regions.reduce((n, r) => n + r.length / r.pageSize, 0);
  }

  get sessions(): ReadonlyMap<string, SourceSession> {
    return this.#sessions;
  }

  /** What this server has done so far, over every session it served: for metrics. */
  figures(): ServerFigures {
    const totals = { ...this.#retired };
    const sessions: Record<string, number> = {};
    for (const session of this.#sessions.values()) {
      sessions[session.state] = (sessions[session.state] ?? 0) + 1;
      const stats = session.stats();
      if (stats) for (const k of SERVED_TOTALS) totals[k] += stats[k];
    }
    return { sessions, ...totals, errors: this.#errors.entries() };
  }

  /** Drops a session from the table; its figures stay in the totals. */
  #forget(id: string): void {
    const session = this.#sessions.get(id);
    if (!session) return;
    this.#sessions.delete(id);
    const stats = session.stats();
    if (stats) for (const k of SERVED_TOTALS) this.#retired[k] += stats[k];
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
    if (this.#release) await this.#image.startReleasing();
    // What every welcome carries: a resuming destination checks that this is the image it was restoring, every byte of it.
    this.#content = (await this.#image.contentDigest()) ?? null;
    if (this.#content)
      this.#log.info({ content: this.#content.slice(0, 16), ms: Date.now() - began }, 'image digested (a file keeps it beside it for the next start)');
    const server = createServer({ noDelay: true }, (socket) => void this.#onConnection(socket));
    if (a.kind === 'unix') {
      await listenOwnerOnly(server, a.path);
    } else {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
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
      else await this.#onControl(socket, reader, first);
    } catch (err) {
      const e = asCodedError(err);
      if (this.#server === null) {
        socket.destroy(); // shutting down: whatever was under way ends with the server, quietly
        return;
      }
      if (this.#unproven.pending(socket)) {
        this.#unproven.failed(socket, e.code); // before it authenticated: counted in a summary line, not logged alone
      } else if (e.code !== ErrorCode.PEER_GONE) {
        this.#errors.add(e.code);
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

  async #onControl(socket: Socket, reader: FrameReader, hello: MessageOf<'hello'>): Promise<void> {
    if (hello.protocol !== PROTOCOL_VERSION)
      throw new PostcopyError(ErrorCode.PROTOCOL_VERSION, `protocol ${hello.protocol} is not supported (this server speaks ${PROTOCOL_VERSION})`);
    if (!(hello.nonce instanceof Uint8Array) || hello.nonce.length !== 32)
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'hello without a 32-byte nonce');
    const nonce = newNonce();
    const token = this.#token;
    send(socket, {
      t: 'challenge',
      protocol: PROTOCOL_VERSION,
      software: SOFTWARE,
      nonce,
      auth: token ? 'token' : 'none',
      ...(token ? { proof: proveToken(token, 'server', nonce, hello.nonce) } : {}),
    });
    const auth = await reader.next(['auth'], this.#handshakeTimeoutMs);
    if (token && !proofMatches(proveToken(token, 'client', nonce, hello.nonce), auth.proof)) {
      throw new PostcopyError(ErrorCode.AUTH_FAILED, 'the token proof does not match');
    }
    this.#unproven.proven(socket);
    if (auth.probe === true) {
      // A destination checking that we answer and that the tokens agree: no session for it.
      send(socket, { t: 'ready', fingerprint: this.#image.fingerprint, ...(this.#content ? { content: this.#content } : {}), regions: this.#welcomeRegions() });
      socket.end();
      // A prober that never closes its side does not hold the socket forever.
      setTimeout(() => socket.destroy(), this.#handshakeTimeoutMs).unref();
      return;
    }
    const session = this.#sessionFor(auth.resume);
    this.#controls.set(session.id, socket);
    let saidBye = false;
    socket.once('close', () => {
      if (this.#controls.get(session.id) !== socket) return; // replaced by a resume
      this.#controls.delete(session.id);
      // Before a live source's switchover the workload still runs here: the migration ends, nothing is lost.
      if (this.#live && this.#live.state !== 'postcopy' && this.#live.state !== 'migrated') {
        this.#live.abort(new PostcopyError(ErrorCode.PEER_GONE, 'the destination left before the switchover; the workload goes on here'));
        session.close('the destination left before the switchover');
      } else if (saidBye) session.close('the destination said bye');
      else session.connectionLost('control channel closed', this.#resumeGraceMs, () => this.#forget(session.id));
      if (session.state === 'closed') {
        if (!saidBye) this.#remember(session.id, 'its control channel closed (cut, or the destination left) before the transfer started');
        this.#forget(session.id);
      }
    });
    // TCP leaves the host: its data channels carry sealed records (a TCP source always holds a token).
    const keys = socket.remoteFamily && token && !this.#plaintextTcp ? dataChannelKeys(token, nonce, hello.nonce) : undefined;
    // On this host (a unix socket) and with an image in shared memory, the destination may take the memory itself.
    session.memoryOffered = !socket.remoteFamily && this.#image.memoryFds() !== null;
    const { memory, ...dataTickets } = session.tickets;
    send(socket, {
      t: 'welcome',
      session: session.id,
      resumed: session.resumes > 0,
      fingerprint: this.#image.fingerprint,
      ...(this.#content ? { content: this.#content } : {}),
      encryption: keys ? 'aes-256-gcm' : 'none',
      regions: this.#welcomeRegions(),
      tickets: session.memoryOffered ? { ...dataTickets, memory } : dataTickets,
      limits: { maxFrame: this.#maxFrame, maxRunBytes: MAX_RUN_BYTES },
      capabilities: [
        'prefault-window',
        'background',
        'rate-limit',
        'zero-runs',
        'have-bitmap',
        'have-chunks',
        'heartbeat',
        'resume',
        'page-checksum',
        'prefetch',
        'deferred-background',
        'page-sizes',
        ...(session.memoryOffered ? ['in-place'] : []),
        ...(this.#release ? ['release-as-sent'] : []),
        ...(this.#live ? ['precopy'] : []),
      ],
    });
    keepAlive(socket, reader, this.#heartbeat);
    const optionsMessage = await reader.next(['options'], this.#handshakeTimeoutMs);
    const options = checkOptions(optionsMessage);
    const units = checkPageSizes(optionsMessage.pageSizes, this.#image.regions);
    // A held-pages bitmap too large for one frame comes first in pieces (`have`), then `start`.
    const have = new Map<number, { region: number; bitmap: Uint8Array }>();
    const prefetch: Uint8Array[] = [];
    let prefetchEntries = 0;
    let start: MessageOf<'start'>;
    for (;;) {
      const msg = await reader.next(['have', 'prefetch', 'start', 'bye'], this.#handshakeTimeoutMs);
      if (msg.t === 'start') {
        start = msg;
        break;
      }
      if (msg.t === 'bye') {
        // Done before any page flowed (it took the image in place, or changed its mind).
        saidBye = true;
        socket.end();
        return;
      }
      if (msg.t === 'prefetch') {
        // A working set to stream ahead of the background: at most one entry per page of the image.
        const entries = checkPrefetch(msg, this.#image.regions);
        prefetchEntries += entries.length / 8;
        if (prefetchEntries > this.#image.regions.reduce((n, r) => n + r.length / r.pageSize, 0))
          throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'a working set with more entries than the image has pages');
        prefetch.push(entries);
        continue;
      }
      const chunk = checkHaveChunk(msg, this.#image.regions);
      const r = this.#image.regions[chunk.region];
      let whole = have.get(chunk.region);
      if (!whole) have.set(chunk.region, (whole = { region: chunk.region, bitmap: new Uint8Array(Math.ceil(r.length / r.pageSize / 8)) }));
      for (let i = 0; i < chunk.bitmap.length; i++) whole.bitmap[chunk.offset + i] |= chunk.bitmap[i];
    }
    const held = [...have.values()].map(({ region, bitmap }) => ({ region, bitmap })).concat(checkHave(start.have, this.#image.regions));
    if (this.#release) this.#admitHolder(session, held);
    // A live source: a destination that takes precopy gets it; any other sees the workload paused before its first page.
    const live = this.#live;
    const precopy = live !== null && optionsMessage.precopy === true;
    if (live && !precopy) await live.pauseForPostcopy();
    session.start(
      options,
      held,
      keys,
      prefetch,
      units,
      precopy ? live : undefined,
      // A budget in pages of each region's own size: the smallest region page size counts the most pages.
      this.#release ? Math.floor(this.#releaseBudgetBytes / Math.min(...this.#image.regions.map((r) => r.pageSize))) : 0,
    );
    send(socket, { t: 'started' });
    if (precopy)
      live.run(session, true).then(
        (report) => this.#log.info({ session: session.id, ...report }, 'the workload runs at the destination now'),
        (err) => {
          const e = asCodedError(err);
          this.#errors.add(e.code);
          this.#log.error({ session: session.id, code: e.code, err: e.message }, 'live migration ended before the switchover; the workload goes on here');
          sendErrorAndClose(socket, e.code, e.message);
        },
      );
    // One `done` per connection (a destination asks again only on a new one): the digest and the checksums are work, and a peer must not be able to ask for them without end.
    let answered = false;
    for (;;) {
      const msg = await reader.next(answered ? ['bye', 'installed'] : ['done', 'bye', 'background', 'installed', 'running']);
      if (msg.t === 'bye') break;
      if (msg.t === 'running') {
        if (!live) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'running goes to a live source');
        live.destinationRunning();
        continue;
      }
      if (msg.t === 'installed') {
        if (!this.#release) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'installed reports go to a source that releases as sent');
        const piece = checkHaveChunk(msg, this.#image.regions);
        this.#image.release(piece.region, piece.offset, piece.bitmap);
        session.confirmInstalled(piece.region, piece.offset, piece.bitmap);
        continue;
      }
      if (msg.t === 'background') {
        session.startBackground();
        continue;
      }
      answered = true;
      const verify = checkVerify(msg.verify, this.#image.regions);
      session.complete();
      this.#log.info({ session: session.id, destination: msg.stats }, 'destination reports every page resident');
      send(socket, { t: 'digest', ...(await this.#image.answerDone(verify)), stats: { ...session.stats() } });
      live?.finished();
    }
    saidBye = true;
    socket.end();
    // Release-as-sent: the destination holds every page and had its digest; nothing is left to serve.
    if (this.#release && answered && this.#image.releasedPages === this.#totalPages()) {
      this.#log.info({ session: session.id, releasedPages: this.#image.releasedPages }, 'the destination holds the whole image: it has moved');
      this.#consumed.resolve();
    }
  }

  /**
   * Release-as-sent: pages already freed exist only at the destination they
   * were freed for. A destination may start only when the pages it holds
   * cover every one of them (it is that destination, resuming); it is then
   * the one they are freed for.
   */
  #admitHolder(session: SourceSession, held: { region: number; bitmap: Uint8Array }[]): void {
    const freed = this.#image.releasedPages;
    if (freed > 0) {
      for (const r of this.#image.regions) {
        const released = this.#image.releasedBitmap(r.id)!;
        const have = held.filter((h) => h.region === r.id).map((h) => h.bitmap);
        const missing = released.some((bits, i) => (bits & ~have.reduce((or, b) => or | (b[i] ?? 0), 0)) !== 0);
        if (missing)
          throw new PostcopyError(
            ErrorCode.IMAGE_CONSUMED,
            `this source frees its image as its destination installs it (release-as-sent): ${freed} page(s) are freed here and held only by that ` +
              `destination, and the pages this destination holds do not cover them (region ${r.id}); it cannot be served without them`,
          );
      }
    }
    this.#image.releasedFor = session.id;
  }

  /** Keeps why a session ended, for a data channel that still attaches to it (the newest ENDED_SESSIONS_KEPT). */
  #remember(id: string, why: string): void {
    this.#ended.set(id, why);
    if (this.#ended.size > ENDED_SESSIONS_KEPT) this.#ended.delete(this.#ended.keys().next().value as string);
  }

  #welcomeRegions(): RegionInfo[] {
    return this.#image.regions.map(({ id, name, length, pageSize, contentLength }) => ({ id, name, length, pageSize, contentLength }));
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
    // Past the switchover the workload runs at its destination: that destination alone may come back, resuming
    // from the pages it holds (this source restarted, or forgot its session after the grace).
    const destinationBack = this.#live?.state === 'postcopy' && resume !== undefined && !active;
    if (this.#live && !destinationBack && (this.#live.state !== 'waiting' || active))
      throw new PostcopyError(
        ErrorCode.UNSUPPORTED,
        this.#live.state === 'postcopy'
          ? 'this live workload runs at its destination already: only that destination may resume'
          : 'a live source moves its workload to one destination',
      );
    // Freeing the image as one destination installs it leaves nothing for a second: once pages are freed, only the destination
    // they were freed for may come back (a restarted source knows it from the journal beside the image; its `have` is checked at start).
    if (this.#release) {
      const busy = active;
      const freed = this.#image.releasedPages;
      if (busy || (freed > 0 && resume !== this.#image.releasedFor))
        throw new PostcopyError(
          ErrorCode.IMAGE_CONSUMED,
          `this source frees its image as its destination installs it (release-as-sent): it serves one destination, ` +
            (busy ? 'and one is being served' : `and ${freed} page(s) were already freed for another (held only there)`),
        );
    }
    const session = new SourceSession(this.#image, this.#log, (err) => {
      this.#errors.add(err.code);
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
