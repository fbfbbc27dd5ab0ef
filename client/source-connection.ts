// The destination's side of the control protocol: connect to a source, prove
// the token (and check the source's proof), negotiate options, open the two
// data channels and hand them to native code, then start, finish, and say bye.
import { closeSync, fstatSync } from 'node:fs';
import { receiveFds } from '../lib/fd-passing.js';
import { connect, type Socket } from 'node:net';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { type Address, formatAddress, parseAddress } from '../lib/address.js';
import {
  DEFAULT_HEARTBEAT,
  DEFAULT_MAX_FRAME,
  FrameReader,
  checkDigest,
  checkWelcome,
  MAX_PREFETCH_ENTRIES,
  PROTOCOL_VERSION,
  SOFTWARE,
  dataChannelKeys,
  keepAlive,
  newNonce,
  proofMatches,
  proveToken,
  send,
  takeSocket,
  type DataChannelKeys,
  type Heartbeat,
  type MessageOf,
  type RegionInfo,
  type VerifyRequest,
} from '../lib/protocol.js';
import type { TransferOptions } from '../lib/transfer.js';
import { defaultMaxImageBytes } from '../lib/limits.js';
import { native } from '../lib/native.js';
import type { Logger } from '../lib/logger.js';
import { entryChunks } from './working-set.js';

/** How a destination (a restore, or a VMM handler) reaches its source. */
export interface SourceOptions {
  source: string | Address;
  token?: string;
  window?: Partial<TransferOptions['window']>;
  background?: Partial<TransferOptions['background']>;
  /** Refuse a source whose image is larger (default: twice this machine's memory). */
  maxImageBytes?: number;
  /** Take plaintext data channels over TCP (only to measure what encryption costs, against a source with plaintextTcp). */
  acceptPlaintextTcp?: boolean;
  /** Refuse packed runs (only to measure what packing saves: by default a destination that can unpack takes them). */
  refusePackedRuns?: boolean;
  /**
   * The page size this destination installs, per region of the image (once
   * its regions are known): larger than the image's (a 2 MiB huge page), the
   * source sends whole such pages only (`page-sizes`).
   */
  pageSizesFor?: (regions: RegionInfo[]) => number[];
  /**
   * This destination can take a live source's precopy rounds: it writes over
   * pages sent again and drops the pages discarded at the switchover (its
   * memory is its own, or a shared memory file it fills).
   */
  precopy?: boolean;
  logger?: Logger;
}

export interface SourceConnectionOptions {
  source: string | Address;
  token?: string;
  transfer: TransferOptions;
  /** Give up on any handshake step after this long (default 10 s). */
  timeoutMs?: number;
  /** Control-channel liveness once welcomed (default: a heartbeat each second, silent after 5 s). */
  heartbeat?: Heartbeat;
  /** See SourceOptions.pageSizesFor. */
  pageSizesFor?: (regions: RegionInfo[]) => number[];
  /** See SourceOptions.precopy. */
  precopy?: boolean;
  /** Ask the source to hold its background stream until startBackground() (when it can: 'deferred-background'). */
  holdBackground?: boolean;
  /** The id of a session to resume on this source. */
  resume?: string;
  /** Refuse a source whose image is larger (default: twice this machine's memory). */
  maxImageBytes?: number;
  /** Take plaintext data channels over TCP (only to measure what encryption costs). */
  acceptPlaintextTcp?: boolean;
  /** See SourceOptions.refusePackedRuns. */
  refusePackedRuns?: boolean;
}

/** How long a goodbye waits for the source to close its side before the socket is dropped. */
const BYE_GRACE_MS = 1000;

/** The held-pages bitmap goes in pieces of at most this many bytes (and at most half the source's frame limit). */
const HAVE_PIECE_BYTES = 1 << 20;

export class SourceConnection {
  readonly session: string;
  readonly regions: RegionInfo[];
  /** Identifies the image the source serves (lib/digest.ts). */
  readonly fingerprint: string;
  /** The digest of the image's whole content, when the source sends one (lib/image.ts contentDigest). */
  readonly content: string | undefined;
  /** The source still held the session asked for in `resume`. */
  readonly resumed: boolean;
  /** Where this connection reached the source (unix:PATH or tcp:HOST:PORT). */
  readonly address: string;
  /** The source can check the installed-pages checksum (`done.verify`). */
  readonly verifiesChecksums: boolean;
  /** The source holds its background stream until startBackground(). */
  readonly backgroundHeld: boolean;
  readonly #capabilities: string[];
  /** The largest control frame the source takes. */
  readonly #maxFrame: number;
  readonly #control: Socket;
  readonly #reader: FrameReader;
  readonly #timeoutMs: number;
  #channels: { urgentFd: number; bulkFd: number; keys?: DataChannelKeys } | null;
  readonly #stopHeartbeats: () => void;

  private constructor(
    address: string,
    control: Socket,
    reader: FrameReader,
    welcome: MessageOf<'welcome'>,
    channels: { urgentFd: number; bulkFd: number; keys?: DataChannelKeys },
    timeoutMs: number,
    backgroundHeld: boolean,
    stopHeartbeats: () => void,
  ) {
    this.backgroundHeld = backgroundHeld;
    this.#stopHeartbeats = stopHeartbeats;
    this.address = address;
    this.#control = control;
    this.#reader = reader;
    this.session = welcome.session;
    this.regions = welcome.regions;
    this.fingerprint = welcome.fingerprint;
    this.content = welcome.content;
    this.resumed = welcome.resumed === true;
    this.#capabilities = Array.isArray(welcome.capabilities) ? welcome.capabilities.filter((c) => typeof c === 'string') : [];
    this.verifiesChecksums = this.#capabilities.includes('page-checksum');
    this.#maxFrame = Number.isSafeInteger(welcome.limits?.maxFrame) && welcome.limits.maxFrame > 0 ? welcome.limits.maxFrame : DEFAULT_MAX_FRAME;
    this.#channels = channels;
    this.#timeoutMs = timeoutMs;
  }

  /**
   * Checks that the source answers and that the tokens agree both ways,
   * without starting a session; resolves with what it serves.
   */
  static async probe(options: Pick<SourceConnectionOptions, 'source' | 'token' | 'timeoutMs'>): Promise<MessageOf<'ready'>> {
    const address = typeof options.source === 'string' ? parseAddress(options.source) : options.source;
    const timeoutMs = options.timeoutMs ?? 10_000;
    const control = await dial(address, timeoutMs);
    const reader = new FrameReader(control);
    try {
      await authenticate(control, reader, options.token, timeoutMs, { probe: true }, formatAddress(address));
      const answer = await reader.next(['ready', 'welcome'], timeoutMs);
      if (answer.t === 'welcome') {
        // A source older than the probe made a session all the same: it answers; the hang-up below ends that session quietly.
        return { t: 'ready', fingerprint: answer.fingerprint, regions: answer.regions };
      }
      const ready = answer;
      if (typeof ready.fingerprint !== 'string' || !Array.isArray(ready.regions))
        throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the source sent a malformed ready');
      return ready;
    } finally {
      control.destroy();
    }
  }

  /**
   * In place: on this host, a source whose image is shared memory hands over
   * the image's fds, one per region (SCM_RIGHTS), and the destination maps
   * them: nothing is copied. Null when the source does not offer it (TCP, or
   * an image that is not shared memory): the caller copies instead.
   */
  static async takeMemory(
    options: Pick<SourceConnectionOptions, 'source' | 'token' | 'timeoutMs' | 'maxImageBytes'>,
  ): Promise<{ regions: RegionInfo[]; fingerprint: string; fds: number[] } | null> {
    const address = typeof options.source === 'string' ? parseAddress(options.source) : options.source;
    const timeoutMs = options.timeoutMs ?? 10_000;
    const control = await dial(address, timeoutMs);
    const reader = new FrameReader(control);
    try {
      await authenticate(control, reader, options.token, timeoutMs, {}, formatAddress(address));
      const welcome = await reader.next(['welcome'], timeoutMs);
      checkWelcome(welcome, options.maxImageBytes ?? defaultMaxImageBytes());
      if (!welcome.capabilities?.includes('in-place') || !(welcome.tickets.memory instanceof Uint8Array)) {
        send(control, { t: 'bye' });
        return null;
      }
      send(control, { t: 'options', window: { forward: 0, backward: 0 }, background: { enabled: false, rateBytesPerSecond: 0 } });
      // The answer is one message with the fds attached: the socket goes to native code before any byte of it can be read here.
      const socket = await dial(address, timeoutMs);
      let fd: number;
      try {
        send(socket, { t: 'attach', session: welcome.session, channel: 'memory', ticket: welcome.tickets.memory });
        fd = takeSocket(socket);
      } catch (err) {
        socket.destroy();
        throw err;
      }
      let got: Awaited<ReturnType<typeof receiveFds>>;
      try {
        got = await receiveFds(fd, { maxBytes: 1 << 20, maxFds: welcome.regions.length, timeoutMs });
      } finally {
        closeSync(fd);
      }
      const fds = got.fds;
      try {
        const sent = JSON.parse(got.payload.toString('utf8')) as { regions?: { id: number; length: number }[] };
        const fits =
          fds.length === welcome.regions.length &&
          Array.isArray(sent.regions) &&
          sent.regions.length === fds.length &&
          sent.regions.every((r, i) => r.id === i && r.length === welcome.regions[i].length && fstatSync(fds[i]).size >= r.length);
        if (!fits) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the source handed over memory that does not match its regions');
      } catch (err) {
        for (const f of fds) closeSync(f);
        throw err instanceof PostcopyError
          ? err
          : new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the source handed over its memory with a malformed description');
      }
      send(control, { t: 'bye' });
      return { regions: welcome.regions, fingerprint: welcome.fingerprint, fds };
    } finally {
      control.end();
      setTimeout(() => control.destroy(), 1000).unref();
    }
  }

  static async open(options: SourceConnectionOptions): Promise<SourceConnection> {
    const address = typeof options.source === 'string' ? parseAddress(options.source) : options.source;
    const timeoutMs = options.timeoutMs ?? 10_000;
    const control = await dial(address, timeoutMs);
    const reader = new FrameReader(control);
    try {
      const { challenge, nonce } = await authenticate(
        control,
        reader,
        options.token,
        timeoutMs,
        options.resume ? { resume: options.resume } : {},
        formatAddress(address),
      );
      const welcome = await reader.next(['welcome'], timeoutMs);
      checkWelcome(welcome, options.maxImageBytes ?? defaultMaxImageBytes());
      // Pages and requests that cross TCP are sealed: a source offering plaintext there is refused.
      if (welcome.encryption !== 'aes-256-gcm' && welcome.encryption !== 'none')
        throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the source names an unknown data-channel encryption');
      if (address.kind === 'tcp' && welcome.encryption !== 'aes-256-gcm' && !options.acceptPlaintextTcp)
        throw new PostcopyError(ErrorCode.AUTH_FAILED, 'the source offers plaintext data channels over TCP: refused');
      const keys = welcome.encryption === 'aes-256-gcm' && options.token ? dataChannelKeys(options.token, challenge.nonce, nonce) : undefined;
      if (welcome.encryption === 'aes-256-gcm' && !keys)
        throw new PostcopyError(ErrorCode.AUTH_REQUIRED, 'the source encrypts its data channels with the token, which this destination does not hold');
      const stopHeartbeats = keepAlive(control, reader, options.heartbeat ?? DEFAULT_HEARTBEAT);
      // A source that cannot hold the background back streams it from the start: the recorded set may then miss pages it sent first.
      const held = options.holdBackground === true && options.transfer.background.enabled && welcome.capabilities?.includes('deferred-background') === true;
      const pageSizes = options.pageSizesFor?.(welcome.regions);
      const huge = pageSizes?.some((size, i) => size !== welcome.regions[i].pageSize) === true;
      if (huge && !welcome.capabilities?.includes('page-sizes'))
        throw new PostcopyError(ErrorCode.UNSUPPORTED, 'the source cannot send whole huge pages (it lacks page-sizes): a newer source is needed');
      // A live source's precopy, when both sides can: the source then sends rounds first, and a switchover marker.
      const precopy = options.precopy === true && welcome.capabilities?.includes('precopy') === true;
      send(control, {
        t: 'options',
        ...options.transfer,
        background: { ...options.transfer.background, enabled: options.transfer.background.enabled && !held },
        ...(huge ? { pageSizes } : {}),
        ...(precopy ? { precopy: true, discardMarks: true } : {}),
        // Bulk runs packed with zstd where the source finds the link slower than packing.
        ...(!options.refusePackedRuns && native.packingAvailable() ? { packedRuns: ['zstd'] } : {}),
      });
      const urgentFd = await openChannel(address, welcome, 'urgent', timeoutMs);
      let bulkFd: number;
      try {
        bulkFd = await openChannel(address, welcome, 'bulk', timeoutMs);
      } catch (err) {
        closeSync(urgentFd);
        throw err;
      }
      return new SourceConnection(
        formatAddress(address),
        control,
        reader,
        welcome,
        { urgentFd, bulkFd, ...(keys ? { keys } : {}) },
        timeoutMs,
        held,
        stopHeartbeats,
      );
    } catch (err) {
      control.destroy();
      throw err;
    }
  }

  /** The data channels' fds (and keys, when encrypted), once: the caller (a native engine) owns them from then on. */
  takeChannels(): { urgentFd: number; bulkFd: number; keys?: DataChannelKeys } {
    if (!this.#channels) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the data channels were already taken');
    const c = this.#channels;
    this.#channels = null;
    return c;
  }

  /**
   * Tells the source to start sending; `have` lists pages already held (bit
   * per page). Bitmaps too large for one frame go first in pieces, or, to a
   * source that cannot take pieces, not at all (it then sends pages we hold,
   * which are dropped as duplicates: slower, never wrong).
   */
  async start(have?: { region: number; bitmap: Uint8Array }[], prefetch?: Uint8Array): Promise<void> {
    // A working set to replay (client/working-set.ts entries) goes first: the source streams it, in order, ahead of its background.
    if (prefetch && this.canPrefetch) for (const chunk of entryChunks(prefetch, MAX_PREFETCH_ENTRIES)) send(this.#control, { t: 'prefetch', entries: chunk });
    const bytes = (have ?? []).reduce((n, h) => n + h.bitmap.length, 0);
    const piece = Math.max(4096, Math.min(HAVE_PIECE_BYTES, Math.floor(this.#maxFrame / 2)));
    if (have && bytes > piece) {
      if (this.#capabilities.includes('have-chunks')) {
        for (const h of have) {
          for (let offset = 0; offset < h.bitmap.length; offset += piece) {
            const bitmap = h.bitmap.subarray(offset, Math.min(h.bitmap.length, offset + piece));
            if (bitmap.some((b) => b !== 0)) send(this.#control, { t: 'have', region: h.region, offset, bitmap });
          }
        }
      }
      have = undefined;
    }
    send(this.#control, { t: 'start', ...(have ? { have } : {}) });
    await this.#reader.next(['started'], this.#timeoutMs);
  }

  /** The source is a running workload's (a live source): its memory is still changing until its switchover. */
  get live(): boolean {
    return this.#capabilities.includes('precopy');
  }

  /** Tells a live source that the workload runs here now (its switchover marker arrived). */
  reportRunning(): void {
    if (!this.#control.destroyed) send(this.#control, { t: 'running' });
  }

  /** A live source's discard round `round` is applied here: it may pause its workload now (the pause then holds less). */
  reportDropped(round: number): void {
    if (!this.#control.destroyed) send(this.#control, { t: 'dropped', round });
  }

  /** The source frees its image as this destination installs it: it wants `installed` reports (release-as-sent). */
  get releasesAsSent(): boolean {
    return this.#capabilities.includes('release-as-sent');
  }

  /** Tells a release-as-sent source that bytes [offset, +bitmap.length) of region `region`'s held-pages bitmap are ours for good. */
  reportInstalled(region: number, offset: number, bitmap: Uint8Array): void {
    if (!this.#control.destroyed) send(this.#control, { t: 'installed', region, offset, bitmap });
  }

  /** The source streams a working set ahead of its background (`prefetch` before `start`). */
  get canPrefetch(): boolean {
    return this.#capabilities.includes('prefetch');
  }

  /** The background stream held back at connection starts now. */
  startBackground(): void {
    if (this.backgroundHeld && !this.#control.destroyed) send(this.#control, { t: 'background' });
  }

  /**
   * Reports completion (with what the source should check, when it can);
   * resolves with the source's digests and stats, or rejects after `timeoutMs`.
   */
  async finish(stats: Record<string, unknown>, timeoutMs: number, verify?: VerifyRequest): Promise<MessageOf<'digest'>> {
    send(this.#control, { t: 'done', stats, ...(verify && this.verifiesChecksums ? { verify } : {}) });
    return checkDigest(await this.#reader.next(['digest'], timeoutMs));
  }

  /** Settles with the reason the control channel ended (the source's error, or the connection failing). */
  failure(): Promise<PostcopyError> {
    return this.#reader.closed;
  }

  /** Drops the connection without a goodbye (the source keeps the session for a resume). */
  abandon(): void {
    this.#control.destroy();
    if (this.#channels) {
      closeSync(this.#channels.urgentFd);
      closeSync(this.#channels.bulkFd);
      this.#channels = null;
    }
  }

  /** Says bye and hangs up; a source that never closes its side (frozen, a half-open link) holds the socket at most BYE_GRACE_MS. */
  close(): void {
    this.#stopHeartbeats();
    if (!this.#control.destroyed) {
      send(this.#control, { t: 'bye' });
      this.#control.end();
      setTimeout(() => this.#control.destroy(), BYE_GRACE_MS).unref();
    }
    if (this.#channels) {
      closeSync(this.#channels.urgentFd);
      closeSync(this.#channels.bulkFd);
      this.#channels = null;
    }
  }
}

/**
 * hello, challenge, auth: proves the token both ways (when either side holds
 * one) and sends `auth` with `extra`. Returns the challenge and our nonce.
 */
async function authenticate(
  control: Socket,
  reader: FrameReader,
  token: string | undefined,
  timeoutMs: number,
  extra: { resume?: string; probe?: boolean },
  where: string,
): Promise<{ challenge: MessageOf<'challenge'>; nonce: Buffer }> {
  const nonce = newNonce();
  send(control, { t: 'hello', protocol: PROTOCOL_VERSION, software: SOFTWARE, nonce });
  const challenge = await reader.next(['challenge'], timeoutMs).catch((err: PostcopyError) => {
    throw notASource(err, where, timeoutMs);
  });
  if (challenge.protocol !== PROTOCOL_VERSION)
    throw new PostcopyError(ErrorCode.PROTOCOL_VERSION, `the source speaks protocol ${challenge.protocol}, not ${PROTOCOL_VERSION}`);
  let proof: Buffer | undefined;
  if (challenge.auth !== 'token' && challenge.auth !== 'none')
    throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `the source offers an unknown authentication (${JSON.stringify(challenge.auth)})`);
  // Holding a token, we take pages only from a source that proves it holds it too, whatever it says.
  if (token && challenge.auth !== 'token')
    throw new PostcopyError(
      ErrorCode.AUTH_FAILED,
      'the source did not prove it holds the token (it asks for no authentication): refused as a possible impostor',
    );
  if (challenge.auth === 'token') {
    if (!token) throw new PostcopyError(ErrorCode.AUTH_REQUIRED, 'the source requires a token (--token-file)');
    if (!proofMatches(proveToken(token, 'server', challenge.nonce, nonce), challenge.proof)) {
      throw new PostcopyError(ErrorCode.AUTH_FAILED, `the tokens differ: the source at ${where} holds another token than this destination's`);
    }
    proof = proveToken(token, 'client', challenge.nonce, nonce);
  }
  send(control, { t: 'auth', ...(proof ? { proof } : {}), ...extra });
  return { challenge, nonce };
}

/**
 * The first answer a source owes is its challenge: a peer that says nothing,
 * or something that is not a frame of ours, is another service at that
 * address (ERR_NOT_A_SOURCE, naming it and what it began with).
 */
function notASource(err: PostcopyError, where: string, timeoutMs: number): PostcopyError {
  if (err.code === ErrorCode.TIMEOUT)
    return new PostcopyError(
      ErrorCode.NOT_A_SOURCE,
      `the peer at ${where} accepted the connection but said nothing within ${timeoutMs} ms: it is not a postcopy source (or it is stuck)`,
    );
  if (err.code === ErrorCode.PROTOCOL_FRAME_TOO_LARGE || err.code === ErrorCode.PROTOCOL_MALFORMED) {
    const head = typeof err.details?.head === 'string' ? err.details.head.replace(/[^\x20-\x7e]+/g, ' ').trim() : '';
    return new PostcopyError(ErrorCode.NOT_A_SOURCE, `the peer at ${where} is not a postcopy source${head ? ` (it began with ${JSON.stringify(head)})` : ''}`);
  }
  return err;
}

function dial(address: Address, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = address.kind === 'unix' ? connect(address.path) : connect({ host: address.host, port: address.port, noDelay: true });
    const where = formatAddress(address);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(
        Object.assign(new PostcopyError(ErrorCode.SOURCE_UNREACHABLE, `cannot reach the source at ${where}: no answer within ${timeoutMs} ms`), {
          address: where,
        }),
      );
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      socket.on('error', () => {});
      resolve(socket);
    });
    socket.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(
        Object.assign(new PostcopyError(ErrorCode.SOURCE_UNREACHABLE, `cannot reach the source at ${where}: ${unreachableReason(err)}`), {
          errno: err.errno,
          syscall: err.syscall,
          address: where,
        }),
      );
    });
  });
}

/** Why a connection failed, in words a user can act on. */
function unreachableReason(err: NodeJS.ErrnoException): string {
  const why: Record<string, string> = {
    ECONNREFUSED: 'nothing listens there (connection refused)',
    ENOENT: 'no such socket',
    EACCES: 'permission denied',
    ENOTFOUND: 'no such host',
    EAI_AGAIN: 'the host name could not be resolved',
    EHOSTUNREACH: 'the host is unreachable',
    ENETUNREACH: 'the network is unreachable',
    ETIMEDOUT: 'the connection timed out',
  };
  return `${why[err.code ?? ''] ?? err.message}${err.code ? ` (${err.code})` : ''}`;
}

async function openChannel(address: Address, welcome: MessageOf<'welcome'>, channel: 'urgent' | 'bulk', timeoutMs: number): Promise<number> {
  const socket = await dial(address, timeoutMs);
  const reader = new FrameReader(socket);
  try {
    send(socket, { t: 'attach', session: welcome.session, channel, ticket: welcome.tickets[channel] });
    await reader.next(['attached'], timeoutMs);
    return takeSocket(socket, reader);
  } catch (err) {
    socket.destroy();
    throw err;
  }
}
