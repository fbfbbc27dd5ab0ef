// The control channel (docs/PROTOCOL.md): length-prefixed msgpack frames,
// the message types, token challenge-response, and handing a connected socket
// over to a native data-plane thread.
//
// Frame layout: u32 big-endian payload length, then a msgpack map whose `t`
// field names the message. Frames larger than the receiver's limit end the
// connection with ERR_PROTOCOL_FRAME_TOO_LARGE.
import { createHmac, hkdfSync, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Socket } from 'node:net';
import { Packr } from 'msgpackr';
import { native } from './native.js';
import { socketFd } from './fd-passing.js';
import { ErrorCode, PostcopyError, asErrorCode } from './errors.js';
import { MAX_REGIONS, MAX_RUN_BYTES } from './limits.js';
import { MAX_WINDOW, type TransferOptions } from './transfer.js';
import { validateBoolean, validateInteger, validateObject } from './validate.js';

export const PROTOCOL_VERSION = 1;
export const SOFTWARE = 'uffd-postcopy/0.1.0';
export const DEFAULT_MAX_FRAME = 4 << 20;

/** How often each end of a control channel says it is alive, and how long a silence means it is not. */
export interface Heartbeat {
  intervalMs: number;
  silenceMs: number;
}
export const DEFAULT_HEARTBEAT: Heartbeat = { intervalMs: 1000, silenceMs: 5000 };

const packr = new Packr({ useRecords: false, mapsAsObjects: true });

/** Every control message, by its `t`. */
export type Message =
  | { t: 'hello'; protocol: number; software: string; nonce: Uint8Array }
  | { t: 'challenge'; protocol: number; software: string; nonce: Uint8Array; auth: 'token' | 'none'; proof?: Uint8Array }
  | { t: 'auth'; proof?: Uint8Array; resume?: string; probe?: boolean }
  | { t: 'ready'; fingerprint: string; content?: string; regions: RegionInfo[] }
  | {
      t: 'welcome';
      session: string;
      resumed: boolean;
      fingerprint: string;
      /** The image's content digest (lib/image.ts contentDigest): every byte of it; absent from a live source. */
      content?: string;
      encryption: Encryption;
      regions: RegionInfo[];
      tickets: { urgent: Uint8Array; bulk: Uint8Array; memory?: Uint8Array };
      limits: { maxFrame: number; maxRunBytes: number };
      capabilities: string[];
    }
  | {
      t: 'options';
      window: { forward: number; backward: number };
      background: { enabled: boolean; rateBytesPerSecond: number };
      /** Per region, the page size the destination installs (bytes), when larger than the region's: every run then holds whole such pages. */
      pageSizes?: number[];
      /** A live source (capability `precopy`): this destination takes precopy rounds, discards and the switchover marker. */
      precopy?: boolean;
      /** With precopy: end each discard round with a mark; this destination answers \`dropped\` once its runs are applied. */
      discardMarks?: boolean;
      /** Codecs this destination unpacks bulk runs with (\`zstd\`): across a link the source may then send packed runs. */
      packedRuns?: string[];
    }
  | { t: 'attach'; session: string; channel: 'urgent' | 'bulk' | 'memory'; ticket: Uint8Array }
  | { t: 'attached' }
  | { t: 'have'; region: number; offset: number; bitmap: Uint8Array }
  | { t: 'start'; have?: { region: number; bitmap: Uint8Array }[] }
  | { t: 'started' }
  | { t: 'prefetch'; entries: Uint8Array }
  | { t: 'background' }
  /** The destination's workload runs (after a live source's switchover marker). */
  | { t: 'running' }
  /** A live source's discard round \`round\` is applied here (its mark arrived). */
  | { t: 'dropped'; round: number }
  | { t: 'installed'; region: number; offset: number; bitmap: Uint8Array }
  | { t: 'done'; stats?: Record<string, unknown>; verify?: VerifyRequest }
  | { t: 'digest'; regions: { id: number; sha256: string }[]; stats: Record<string, unknown>; checksums?: RegionChecksum[] }
  | { t: 'error'; code: string; message: string }
  | { t: 'heartbeat' }
  | { t: 'bye' };

/**
 * What a destination asks the source to check at the end: per region, the
 * source pages it did not install from the source's data (flat [first, count,
 * ...] ranges, ascending); the source answers with the installed-pages
 * checksum of the rest (addon/page_checksum.h).
 */
export interface VerifyRequest {
  regions: { id: number; skip: number[] }[];
}

/** The installed-pages checksum of one region: 16 hex digits, over `pages` pages. */
export interface RegionChecksum {
  id: number;
  sum: string;
  pages: number;
}

/** How the data channels are protected: AES-256-GCM records on TCP, plaintext on unix sockets. */
export type Encryption = 'aes-256-gcm' | 'none';

/** One AES-256 key per data-channel direction (addon/secure_channel.h). */
export interface DataChannelKeys {
  urgentDown: Buffer;
  urgentUp: Buffer;
  bulkDown: Buffer;
}

/**
 * The data-channel keys of one connection: HKDF-SHA256 of the token, salted
 * with both handshake nonces (fresh each connection, so each resume has new
 * keys and record numbers start again safely).
 */
export function dataChannelKeys(token: string, sourceNonce: Uint8Array, destNonce: Uint8Array): DataChannelKeys {
  const okm = Buffer.from(hkdfSync('sha256', token, Buffer.concat([destNonce, sourceNonce]), 'uffd-postcopy data channels v1', 96));
  return { urgentDown: okm.subarray(0, 32), urgentUp: okm.subarray(32, 64), bulkDown: okm.subarray(64, 96) };
}

export type MessageType = Message['t'];
export type MessageOf<T extends MessageType> = Extract<Message, { t: T }>;

export interface RegionInfo {
  id: number;
  name: string;
  /** Whole pages. */
  length: number;
  pageSize: number;
  /** The image's own size in bytes (length rounds it up to whole pages); absent from older sources. */
  contentLength?: number;
}

export function encodeFrame(message: Message): Buffer {
  const body = packr.pack(message);
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  return frame;
}

/**
 * Reads frames from a socket in order. `next()` resolves with the next message
 * (checked against the expected types) or rejects on a malformed frame, an
 * oversized frame, a timeout or the peer leaving.
 */
export class FrameReader {
  readonly #socket: Socket;
  readonly #maxFrame: number;
  // Chunks not yet read as frames. A frame is joined once, when all of it is
  // here: a peer dribbling a large frame costs a copy of it, not one per chunk.
  #chunks: Buffer[] = [];
  #bufferedBytes = 0;
  #queue: Message[] = [];
  #failure: PostcopyError | null = null;
  #waiter: (() => void) | null = null;
  #reportClosed!: (err: PostcopyError) => void;
  #lastHeardAt = Date.now();
  readonly #closed = new Promise<PostcopyError>((resolve) => (this.#reportClosed = resolve));
  #onData = (chunk: Buffer) => this.#push(chunk);
  #onEnd = () => this.#fail(new PostcopyError(ErrorCode.PEER_GONE, 'the peer closed the connection'));
  #onError = (err: Error) => this.#fail(new PostcopyError(ErrorCode.PEER_GONE, `connection error: ${err.message}`));

  constructor(socket: Socket, maxFrame = DEFAULT_MAX_FRAME) {
    this.#socket = socket;
    this.#maxFrame = maxFrame;
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    socket.on('error', this.#onError);
  }

  /** The next message; `types` lists what may come now, anything else is a protocol error. */
  async next<T extends MessageType>(types: readonly T[], timeoutMs = 0): Promise<MessageOf<T>> {
    let timer: NodeJS.Timeout | undefined;
    try {
      while (this.#queue.length === 0) {
        if (this.#failure) throw this.#failure;
        await new Promise<void>((resolve) => {
          this.#waiter = resolve;
          if (timeoutMs > 0 && !timer) {
            timer = setTimeout(() => this.#fail(new PostcopyError(ErrorCode.TIMEOUT, `no ${types.join('/')} within ${timeoutMs} ms`)), timeoutMs);
          }
        });
      }
    } finally {
      clearTimeout(timer);
    }
    const message = this.#queue.shift()!;
    if (message.t === 'error' && !types.includes('error' as T)) {
      const remote = message as MessageOf<'error'>;
      throw remoteError(remote);
    }
    if (!types.includes(message.t as T)) {
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `unexpected '${message.t}' message (expected ${types.join('/')})`);
    }
    return message as MessageOf<T>;
  }

  /** Stops reading and returns bytes buffered past the last frame (must be none before a handoff). */
  detach(): Buffer {
    this.#socket.pause();
    this.#socket.off('data', this.#onData);
    this.#socket.off('end', this.#onEnd);
    this.#socket.off('close', this.#onEnd);
    this.#socket.off('error', this.#onError);
    return this.#take(this.#bufferedBytes);
  }

  /**
   * Settles with the reason the connection ended: the error the peer reported,
   * or the connection failing. Reading it consumes no message.
   */
  get closed(): Promise<PostcopyError> {
    return this.#closed;
  }

  /** Ends reading with `err`: pending and later next() calls reject with it. */
  abandon(err: PostcopyError): void {
    this.#fail(err);
  }

  /** When the peer last sent anything (ms since the epoch). */
  get lastHeardAt(): number {
    return this.#lastHeardAt;
  }

  #push(chunk: Buffer): void {
    if (this.#failure) return; // the caller answers and closes; ignore the rest
    this.#lastHeardAt = Date.now();
    this.#chunks.push(chunk);
    this.#bufferedBytes += chunk.length;
    while (this.#bufferedBytes >= 4) {
      const length = this.#peek(4).readUInt32BE(0);
      if (length > this.#maxFrame) {
        // What the peer began with, for a message that can say what it is (an SSH banner, an HTTP reply).
        const head = this.#peek(Math.min(this.#bufferedBytes, 24)).toString('latin1');
        this.#fail(new PostcopyError(ErrorCode.PROTOCOL_FRAME_TOO_LARGE, `a ${length}-byte frame exceeds the ${this.#maxFrame}-byte limit`, { head }));
        return;
      }
      if (this.#bufferedBytes < 4 + length) break;
      const body = this.#take(4 + length).subarray(4);
      let message: unknown;
      try {
        message = packr.unpack(body);
      } catch {
        message = undefined;
      }
      if (!message || typeof message !== 'object' || typeof (message as { t?: unknown }).t !== 'string') {
        this.#fail(new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'a frame that is not a control message'));
        return;
      }
      if ((message as Message).t === 'heartbeat') continue; // liveness only: lastHeardAt moved
      this.#queue.push(message as Message);
      if ((message as Message).t === 'error') this.#reportClosed(remoteError(message as MessageOf<'error'>));
    }
    this.#wake();
  }

  /** The first `n` buffered bytes, leaving them buffered (n is small: a length prefix). */
  #peek(n: number): Buffer {
    if (this.#chunks[0].length < n) this.#chunks = [Buffer.concat(this.#chunks)];
    return this.#chunks[0];
  }

  /** Removes and returns the first `n` buffered bytes, joining chunks only when a frame spans them. */
  #take(n: number): Buffer {
    let out: Buffer;
    if (this.#chunks.length && this.#chunks[0].length >= n) {
      out = this.#chunks[0].subarray(0, n);
    } else {
      const parts: Buffer[] = [];
      let need = n;
      for (const c of this.#chunks) {
        if (need === 0) break;
        parts.push(c.length <= need ? c : c.subarray(0, need));
        need -= Math.min(need, c.length);
      }
      out = Buffer.concat(parts, n);
    }
    // Drop what was taken: whole chunks in one splice, then the head of the next.
    let left = n;
    let whole = 0;
    while (whole < this.#chunks.length && this.#chunks[whole].length <= left) left -= this.#chunks[whole++].length;
    this.#chunks.splice(0, whole);
    if (left > 0) this.#chunks[0] = this.#chunks[0].subarray(left);
    this.#bufferedBytes -= n;
    return out;
  }

  #fail(err: PostcopyError): void {
    if (!this.#failure) this.#failure = err;
    this.#reportClosed(err); // a no-op when an 'error' message already settled it
    this.#wake();
  }

  #wake(): void {
    const w = this.#waiter;
    this.#waiter = null;
    w?.();
  }
}

function remoteError(message: MessageOf<'error'>): PostcopyError {
  return new PostcopyError(asErrorCode(message.code, ErrorCode.PROTOCOL_MALFORMED), `peer reported: ${message.message}`, { remote: true });
}

export function send(socket: Socket, message: Message): void {
  socket.write(encodeFrame(message));
}

/**
 * Keeps a control channel's liveness in both directions: sends a heartbeat
 * every `intervalMs`, and when nothing at all has arrived for `silenceMs` fails
 * the reader with ERR_PEER_SILENT and destroys the socket (a link that went
 * silent without FIN or RST). Returns the function that stops both.
 */
export function keepAlive(socket: Socket, reader: FrameReader, heartbeat: Heartbeat): () => void {
  const beat = setInterval(
    () => {
      if (socket.destroyed) return;
      if (Date.now() - reader.lastHeardAt > heartbeat.silenceMs) {
        reader.abandon(new PostcopyError(ErrorCode.PEER_SILENT, `the peer sent nothing for ${heartbeat.silenceMs} ms`));
        socket.destroy();
        return;
      }
      // A peer that stopped reading must not make us buffer heartbeats without end.
      if (socket.writableLength < 64 << 10) send(socket, { t: 'heartbeat' });
    },
    Math.max(10, Math.min(heartbeat.intervalMs, heartbeat.silenceMs / 2)),
  );
  beat.unref();
  const stop = () => clearInterval(beat);
  socket.once('close', stop);
  return stop;
}

/** Sends an error message and closes the connection once it is written. */
export function sendErrorAndClose(socket: Socket, code: string, message: string): void {
  if (socket.destroyed) return;
  socket.end(encodeFrame({ t: 'error', code, message }));
  setTimeout(() => socket.destroy(), 1000).unref();
}

// ---- token challenge-response: the token never crosses the wire ----

export function newNonce(): Buffer {
  return randomBytes(32);
}

/** HMAC-SHA256(token, role | first nonce | second nonce): each side proves it holds the token. */
export function proveToken(token: string, role: 'client' | 'server', serverNonce: Uint8Array, clientNonce: Uint8Array): Buffer {
  const mac = createHmac('sha256', token).update(`uffd-postcopy ${role} proof\0`);
  return role === 'server' ? mac.update(clientNonce).update(serverNonce).digest() : mac.update(serverNonce).update(clientNonce).digest();
}

export function proofMatches(expected: Buffer, got: unknown): boolean {
  return got instanceof Uint8Array && got.length === expected.length && timingSafeEqual(expected, got);
}

/**
 * Hands a connected socket to native code: a blocking duplicate of its fd that
 * the data plane owns; the JS socket is destroyed. Call only when no bytes are
 * buffered in JS (the protocol guarantees silence at this point).
 */
export function takeSocket(socket: Socket, reader?: FrameReader): number {
  const leftover = reader ? reader.detach() : Buffer.alloc(0);
  if (leftover.length > 0) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'bytes arrived on a data channel before it was handed over');
  socket.pause();
  const handleFd = socketFd(socket);
  if (handleFd < 0) throw new PostcopyError(ErrorCode.PEER_GONE, 'the data channel closed during set-up');
  const fd = native.takeSocketFd(handleFd);
  socket.destroy();
  return fd;
}

// ---- each message checked in one place, beside its type ----

/** Checks a welcome: sizes first (before anything is allocated for them), then every field. */
export function checkWelcome(w: MessageOf<'welcome'>, maxImageBytes: number): void {
  // Sizes first, before anything is allocated for them.
  if (Array.isArray(w.regions) && w.regions.length > MAX_REGIONS)
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `the source claims ${w.regions.length} regions; at most ${MAX_REGIONS} are accepted`);
  const total = Array.isArray(w.regions) ? w.regions.reduce((n, r) => n + (Number.isSafeInteger(r?.length) ? r.length : Infinity), 0) : 0;
  if (total > maxImageBytes)
    throw new PostcopyError(
      ErrorCode.PROTOCOL_OUT_OF_RANGE,
      `the source claims a ${total}-byte image; this destination accepts at most ${maxImageBytes} bytes (maxImageBytes)`,
    );
  const ok =
    typeof w.session === 'string' &&
    typeof w.fingerprint === 'string' &&
    (w.content === undefined || (typeof w.content === 'string' && /^[0-9a-f]{64}$/.test(w.content))) &&
    Array.isArray(w.regions) &&
    w.regions.length > 0 &&
    w.regions.every(
      (r, i) =>
        r &&
        r.id === i &&
        Number.isSafeInteger(r.length) &&
        r.length > 0 &&
        Number.isSafeInteger(r.pageSize) &&
        r.pageSize >= 4096 &&
        r.pageSize <= MAX_RUN_BYTES &&
        (r.pageSize & (r.pageSize - 1)) === 0 &&
        r.length % r.pageSize === 0 &&
        (r.contentLength === undefined || (Number.isSafeInteger(r.contentLength) && r.contentLength > r.length - r.pageSize && r.contentLength <= r.length)),
    ) &&
    w.tickets?.urgent instanceof Uint8Array &&
    w.tickets?.bulk instanceof Uint8Array;
  if (!ok) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the source sent a malformed welcome');
}

/** The transfer options a destination asked for, each field checked. */
export function checkOptions(msg: MessageOf<'options'>): TransferOptions {
  try {
    const window = validateObject(msg.window, 'window');
    const background = validateObject(msg.background, 'background');
    return {
      window: {
        forward: validateInteger(window.forward, 'window.forward', 0, MAX_WINDOW),
        backward: validateInteger(window.backward, 'window.backward', 0, MAX_WINDOW),
      },
      background: {
        enabled: validateBoolean(background.enabled, 'background.enabled'),
        rateBytesPerSecond: validateInteger(background.rateBytesPerSecond, 'background.rateBytesPerSecond'),
      },
    };
  } catch (err) {
    throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `bad options: ${(err as Error).message}`);
  }
}

/**
 * options.pageSizes: per region (all of them, in order), the destination's
 * page size: a power of two from the region's own page size to one run.
 * Returns the pages of the region per destination page (1 when absent).
 */
export function checkPageSizes(pageSizes: unknown, regions: readonly { length: number; pageSize: number }[]): number[] {
  if (pageSizes === undefined) return regions.map(() => 1);
  if (!Array.isArray(pageSizes) || pageSizes.length !== regions.length)
    throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'options.pageSizes must list one page size per region');
  return pageSizes.map((size, i) => {
    const r = regions[i];
    const ok = Number.isSafeInteger(size) && size >= r.pageSize && size <= MAX_RUN_BYTES && (size & (size - 1)) === 0 && r.length % size === 0;
    if (!ok) throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `options.pageSizes[${i}]: ${size} is not a page size region ${i} can be served in`);
    return size / r.pageSize;
  });
}

/**
 * One `have` message: bytes [offset, offset + bitmap.length) of a region's
 * held-pages bitmap (sent in pieces when the whole would not fit a frame).
 */
export function checkHaveChunk(
  msg: MessageOf<'have'> | MessageOf<'installed'>,
  regions: readonly { length: number; pageSize: number }[],
): { region: number; offset: number; bitmap: Uint8Array } {
  const region = Number.isSafeInteger(msg.region) ? regions[msg.region] : undefined;
  const size = region ? Math.ceil(region.length / region.pageSize / 8) : 0;
  if (!region || !(msg.bitmap instanceof Uint8Array) || !Number.isSafeInteger(msg.offset) || msg.offset < 0 || msg.offset + msg.bitmap.length > size) {
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'have names an unknown region or bytes outside its bitmap');
  }
  return { region: msg.region, offset: msg.offset, bitmap: msg.bitmap };
}

/** start.have: per region, a bitmap of exactly one bit per page of that region. */
export function checkHave(have: unknown, regions: readonly { length: number; pageSize: number }[]): { region: number; bitmap: Uint8Array }[] {
  if (have === undefined) return [];
  if (!Array.isArray(have)) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'start.have must be a list');
  return have.map((h) => {
    const region = Number.isSafeInteger(h?.region) ? regions[h.region] : undefined;
    if (!region || !(h.bitmap instanceof Uint8Array) || h.bitmap.length !== Math.ceil(region.length / region.pageSize / 8)) {
      throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'start.have names an unknown region or has a bitmap of the wrong size');
    }
    return { region: h.region as number, bitmap: h.bitmap };
  });
}

/** Working-set entries per `prefetch` message (8 bytes each: 512 KiB, well under a frame). */
export const MAX_PREFETCH_ENTRIES = 65536;

/**
 * prefetch.entries: u64 little-endian entries, region << 48 | page, each
 * inside the image (lib/working-set.ts). Returns them as they came.
 */
export function checkPrefetch(msg: MessageOf<'prefetch'>, regions: readonly { length: number; pageSize: number }[]): Uint8Array {
  const e = msg.entries;
  if (!(e instanceof Uint8Array) || e.length % 8 !== 0) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'prefetch.entries must be 8-byte entries');
  if (e.length / 8 > MAX_PREFETCH_ENTRIES)
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `more than ${MAX_PREFETCH_ENTRIES} prefetch entries in one message`);
  forEachEntry(e, (id, page) => {
    const region = regions[id];
    if (!region || page >= region.length / region.pageSize) throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'a prefetch entry lies outside the image');
  });
  return e;
}

/** Calls fn(region, page) for each working-set entry (u64 LE, region << 48 | page), in order. */
export function forEachEntry(entries: Uint8Array, fn: (region: number, page: number) => void): void {
  const view = new DataView(entries.buffer, entries.byteOffset, entries.byteLength);
  for (let k = 0; k + 8 <= entries.length; k += 8) fn(view.getUint16(k + 6, true), view.getUint32(k, true) + view.getUint16(k + 4, true) * 2 ** 32);
}

/** Ranges per region a verify request may list (the destination sends none past this: addon/fault_engine.cc kMaxSkipRanges). */
export const MAX_VERIFY_RANGES = 100_000;

/**
 * done.verify: known regions, each named once, with ascending, disjoint
 * ranges inside the region. Returns the ranges as [first, count] pairs.
 */
export function checkVerify(verify: unknown, regions: readonly { length: number; pageSize: number }[]): { id: number; skip: [number, number][] }[] | undefined {
  if (verify === undefined) return undefined;
  const bad = (why: string) => new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `done.verify: ${why}`);
  const list = (verify as VerifyRequest | null)?.regions;
  if (!Array.isArray(list)) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'done.verify must list regions');
  const seen = new Set<number>();
  return list.map((r) => {
    const region = Number.isSafeInteger(r?.id) ? regions[r.id] : undefined;
    if (!region || seen.has(r.id)) throw bad('an unknown or repeated region');
    seen.add(r.id);
    if (!Array.isArray(r.skip) || r.skip.length % 2) throw bad(`region ${r.id}: skip must be [first, count] pairs`);
    if (r.skip.length / 2 > MAX_VERIFY_RANGES) throw bad(`region ${r.id}: more than ${MAX_VERIFY_RANGES} ranges`);
    const pages = region.length / region.pageSize;
    const skip: [number, number][] = [];
    let end = 0;
    for (let k = 0; k < r.skip.length; k += 2) {
      const [first, count] = [r.skip[k], r.skip[k + 1]];
      if (!Number.isSafeInteger(first) || !Number.isSafeInteger(count) || count < 1 || first < end || first + count > pages)
        throw bad(`region ${r.id}: ranges must ascend, not overlap, and lie inside the region`);
      skip.push([first, count]);
      end = first + count;
    }
    return { id: r.id, skip };
  });
}

/** A digest message, each field checked. */
export function checkDigest(digest: MessageOf<'digest'>): MessageOf<'digest'> {
  const checksumsOk =
    digest.checksums === undefined ||
    (Array.isArray(digest.checksums) &&
      digest.checksums.every(
        (c) => c && Number.isSafeInteger(c.id) && typeof c.sum === 'string' && /^[0-9a-f]{16}$/.test(c.sum) && Number.isSafeInteger(c.pages),
      ));
  const ok =
    checksumsOk &&
    Array.isArray(digest.regions) &&
    digest.regions.every((r) => r && Number.isSafeInteger(r.id) && typeof r.sha256 === 'string') &&
    digest.stats &&
    typeof digest.stats === 'object';
  if (!ok) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the source sent a malformed digest');
  return digest;
}
