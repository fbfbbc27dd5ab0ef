// The page-fault handler a VMM hands its guest memory to (Firecracker style):
// listens on a unix socket; each VMM connects and sends, in one message, a JSON
// array describing its memory regions with its userfaultfd attached
// (SCM_RIGHTS). Each VMM gets its own session with the source and its own
// native fault engine; its hang-up ends the session and frees everything.
import { EventEmitter } from 'node:events';
import { closeSync, chmodSync, lstatSync, readlinkSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { receiveFds, peerCredentials } from '../lib/fd-passing.js';
import { hasOverlap } from '../lib/validate.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import type { RegionInfo } from '../lib/protocol.js';
import type { TransferOptions } from '../server/session.js';
import { SourceConnection, transferOptions, type SourceOptions } from './source-connection.js';
import { FaultEngine, type TargetRegion } from './fault-engine.js';
import { summarize, type RestoreReport } from './report.js';

/** One entry of the VMM's handshake, as Firecracker sends it. */
export interface GuestRegion {
  base_host_virt_addr: number;
  size: number;
  offset: number;
  page_size?: number;
  /** Deprecated alias of page_size; despite its name it holds bytes. */
  page_size_kib?: number;
}

export interface VmmHandlerOptions extends SourceOptions {
  /** A VMM that connects but sends no handshake within this is dropped (default 10 s). */
  handshakeTimeoutMs?: number;
}

export interface VmmSessionSummary extends RestoreReport {
  vmmPid: number;
  removedPages: number;
  zeroFilledAfterRemove: number;
  complete: boolean;
}

interface VmmSession {
  pid: number;
  socket: Socket;
  uffd: number;
  engine: FaultEngine | null;
  connection: SourceConnection | null;
}

/**
 * Events: 'session-start' ({pid}), 'session-end' (VmmSessionSummary),
 * 'rejected' ({pid, code, message}).
 */
export class VmmHandler extends EventEmitter {
  readonly #options: VmmHandlerOptions;
  readonly #transfer: TransferOptions;
  readonly #log: Logger;
  readonly #sessions = new Set<VmmSession>();
  #server: Server | null = null;

  constructor(options: VmmHandlerOptions) {
    super();
    this.#options = options;
    this.#log = options.logger ?? silentLogger;
    this.#transfer = transferOptions(options);
  }

  get activeSessions(): number {
    return this.#sessions.size;
  }

  /** Listens on `path` (created 0600). */
  async listen(path: string): Promise<void> {
    // pauseOnConnect: no JS read may take the handshake (and its fd) from us.
    const server = createServer({ pauseOnConnect: true }, (socket) => void this.#onVmm(socket));
    try {
      if (lstatSync(path).isSocket()) unlinkSync(path);
    } catch {
      // nothing there
    }
    const oldUmask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(path, resolve);
      });
    } finally {
      process.umask(oldUmask);
    }
    chmodSync(path, 0o600);
    this.#server = server;
    this.#log.info({ socket: path, ...this.#transfer }, 'waiting for VMMs');
  }

  async close(): Promise<void> {
    const server = this.#server;
    this.#server = null;
    for (const s of [...this.#sessions]) this.#end(s, 'handler closing');
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  async #onVmm(socket: Socket): Promise<void> {
    socket.on('error', () => {});
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;
    let pid = 0;
    const received: number[] = [];
    try {
      pid = peerCredentials(fd).pid;
      const msg = await receiveFds(fd, { maxBytes: 64 << 10, maxFds: 4, timeoutMs: this.#options.handshakeTimeoutMs ?? 10_000 });
      received.push(...msg.fds);
      if (msg.payload.length === 0) throw new PostcopyError(ErrorCode.PEER_GONE, 'the VMM closed the socket before its handshake');
      if (msg.fds.length !== 1) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `the handshake must carry exactly one fd (the userfaultfd), not ${msg.fds.length}`);
      if (!isUserfaultfd(msg.fds[0])) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the fd sent is not a userfaultfd');
      const guest = parseHandshake(msg.payload);
      const session: VmmSession = { pid, socket, uffd: msg.fds[0], engine: null, connection: null };
      received.length = 0;
      this.#sessions.add(session);
      // The VMM keeps its socket open while it runs; its hang-up ends the session.
      socket.once('close', () => this.#end(session, 'the VMM hung up'));
      socket.resume();
      await this.#start(session, guest);
    } catch (err) {
      for (const f of received) closeSync(f);
      const e = err instanceof PostcopyError ? err : new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, (err as Error).message);
      this.#log.warn({ vmmPid: pid, code: e.code, err: e.message }, 'VMM handshake refused; connection closed');
      this.emit('rejected', { pid, code: e.code, message: e.message });
      for (const s of this.#sessions) if (s.socket === socket) this.#end(s, 'handshake refused');
      socket.destroy();
    }
  }

  async #start(session: VmmSession, guest: GuestRegion[]): Promise<void> {
    const connection = await SourceConnection.open({ source: this.#options.source, token: this.#options.token, transfer: this.#transfer });
    session.connection = connection;
    if (session.socket.destroyed) return this.#end(session, 'the VMM hung up during set-up');
    const targets = mapOntoImage(guest, connection.regions);
    const { urgentFd, bulkFd } = connection.takeChannels();
    const engine = new FaultEngine({
      uffd: session.uffd,
      sourceRegions: connection.regions.map((r) => ({ pages: r.length / r.pageSize, pageSize: r.pageSize })),
      regions: targets,
      urgentFd,
      bulkFd,
      logger: this.#log.child({ vmmPid: session.pid }),
    });
    session.engine = engine;
    engine.on('memory-event', (e) => this.#log.info({ vmmPid: session.pid, event: e.type, start: e.a, end: e.b }, 'memory event'));
    engine.start();
    // Pages no guest region maps are marked held, so the source never sends them.
    await connection.start(uncoveredPages(targets, connection.regions));
    this.#log.info({ vmmPid: session.pid, session: connection.session, regions: targets.length, bytes: targets.reduce((n, t) => n + t.length, 0) }, 'VMM session started');
    this.emit('session-start', { pid: session.pid });
    engine.whenResident().then(
      async () => {
        const digest = await connection.finish(summarize(engine.stats(), this.#transfer));
        this.#log.info({ vmmPid: session.pid, sourcePagesSent: digest.stats.pagesSent }, 'every guest page is resident');
      },
      (err: PostcopyError) => this.#log.error({ vmmPid: session.pid, code: err.code, err: err.message }, 'VMM session failed; its faults can no longer be served'),
    ).catch((err) => this.#log.warn({ vmmPid: session.pid, err: (err as Error).message }, 'finishing with the source failed'));
  }

  #end(session: VmmSession, reason: string): void {
    if (!this.#sessions.delete(session)) return;
    // Stop first: the final figures are read once every engine thread has finished.
    session.engine?.stop();
    const stats = session.engine?.stats();
    session.connection?.close();
    closeSync(session.uffd);
    session.socket.destroy();
    if (stats) {
      const summary: VmmSessionSummary = {
        ...summarize(stats, this.#transfer),
        vmmPid: session.pid,
        removedPages: stats.removedPages,
        zeroFilledAfterRemove: stats.zeroFilledAfterRemove,
        complete: stats.residentPages === stats.totalPages,
      };
      this.#log.info({ reason, ...summary }, 'VMM session ended');
      this.emit('session-end', summary);
    } else {
      this.#log.info({ vmmPid: session.pid, reason }, 'VMM session ended');
    }
  }
}

function isUserfaultfd(fd: number): boolean {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[userfaultfd]';
  } catch {
    return false;
  }
}

const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

/** Parses and checks the shape of the VMM's JSON handshake. */
export function parseHandshake(payload: Buffer): GuestRegion[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(payload.toString('utf8'));
  } catch {
    throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the handshake is not JSON');
  }
  if (!Array.isArray(parsed) || parsed.length === 0) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the handshake must be a non-empty JSON array of regions');
  return parsed.map((r, i) => {
    if (!r || typeof r !== 'object') throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `region ${i} is not an object`);
    const { base_host_virt_addr: base, size, offset, page_size, page_size_kib } = r as Record<string, unknown>;
    if (!isInt(base) || !isInt(size) || size === 0 || !isInt(offset)) {
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `region ${i} needs integer base_host_virt_addr, size (> 0) and offset`);
    }
    for (const [name, v] of [['page_size', page_size], ['page_size_kib', page_size_kib]] as const) {
      if (v !== undefined && (!isInt(v) || v < 4096 || (v & (v - 1)) !== 0)) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `region ${i}: ${name} must be a power of two >= 4096`);
    }
    return { base_host_virt_addr: base, size, offset, page_size: (page_size ?? page_size_kib ?? 4096) as number };
  });
}

/**
 * Places each guest region on the source image: `offset` counts from the start
 * of the image (the source's regions laid end to end). A region must fall
 * inside one source region, be page-aligned, and overlap no other region.
 */
export function mapOntoImage(guest: GuestRegion[], image: RegionInfo[]): Required<TargetRegion>[] {
  const targets = guest.map((g, i) => {
    const pageSize = g.page_size ?? 4096;
    if (g.base_host_virt_addr % pageSize || g.size % pageSize || g.offset % pageSize) {
      throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} is not aligned to its ${pageSize}-byte pages`);
    }
    let start = 0;
    for (const r of image) {
      if (g.offset >= start && g.offset + g.size <= start + r.length) {
        if (r.pageSize !== pageSize) throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} uses ${pageSize}-byte pages, the image ${r.pageSize}`);
        return { base: g.base_host_virt_addr, length: g.size, pageSize, sourceRegion: r.id, sourcePage: (g.offset - start) / pageSize };
      }
      start += r.length;
    }
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} [${g.offset}, ${g.offset + g.size}) falls outside the ${start}-byte image`);
  });
  if (hasOverlap(guest.map((g) => [g.base_host_virt_addr, g.base_host_virt_addr + g.size]))) throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'guest regions overlap in memory');
  if (hasOverlap(guest.map((g) => [g.offset, g.offset + g.size]))) throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'guest regions overlap in the image');
  return targets;
}

/** For each source region, a bitmap of the pages no target covers (for `start.have`). */
function uncoveredPages(targets: Required<TargetRegion>[], image: RegionInfo[]): { region: number; bitmap: Uint8Array }[] {
  return image.map((r) => {
    const pages = r.length / r.pageSize;
    const bitmap = new Uint8Array(Math.ceil(pages / 8)).fill(0xff);
    for (const t of targets) {
      if (t.sourceRegion !== r.id) continue;
      for (let p = t.sourcePage; p < t.sourcePage + t.length / t.pageSize; p++) bitmap[p >> 3] &= ~(1 << (p & 7));
    }
    for (let p = pages; p < bitmap.length * 8; p++) bitmap[p >> 3] &= ~(1 << (p & 7)); // no bits past the end
    return { region: r.id, bitmap };
  });
}
