// One destination's control conversation with the source, as a state table
// (docs/PROTOCOL.md). Each phase names the messages it accepts and has one
// short handler, which answers and moves on:
//
//   hello     the destination said hello; challenged, it proves the token  <- auth
//   proven    it proved it: a probe is answered `ready`; a session `welcome`
//   welcomed  it says how pages should come                                <- options
//   optioned  pages it holds, a working set to replay, then start (or bye)  <- have, prefetch, start, bye
//   started   pages flow; it asks for the background, reports installs,
//             says its workload runs, and reports every page resident      <- done, bye, background, installed, running
//   answered  its digest went (one `done` per connection)                  <- bye, installed
//   closed    it said bye, or was answered for good
//
// The phases before `started` are bounded by the handshake timeout; after,
// heartbeats keep the channel honest. What the session table does when the
// channel goes (a pause, an end) is the page server's.
import type { Socket } from 'node:net';
import { ErrorCode, PostcopyError, type CodedError } from '../lib/errors.js';
import type { Image } from '../lib/image.js';
import { MAX_RUN_BYTES } from '../lib/limits.js';
import { native } from '../lib/native.js';
import type { Logger } from '../lib/logger.js';
import {
  PROTOCOL_VERSION,
  SOFTWARE,
  checkHave,
  checkHaveChunk,
  checkOptions,
  checkPageSizes,
  checkPrefetch,
  checkVerify,
  dataChannelKeys,
  keepAlive,
  newNonce,
  proofMatches,
  proveToken,
  send,
  sendErrorAndClose,
  type DataChannelKeys,
  type FrameReader,
  type Heartbeat,
  type MessageOf,
  type MessageType,
  type RegionInfo,
} from '../lib/protocol.js';
import { StateMachine, type TransitionTable } from '../lib/state-machine.js';
import type { TransferOptions } from '../lib/transfer.js';
import type { LiveServing } from './live-serving.js';
import type { ReleaseAsSent } from './release.js';
import type { SourceSession } from './session.js';

export type ControlPhase = 'hello' | 'proven' | 'welcomed' | 'optioned' | 'started' | 'answered' | 'closed';

const TRANSITIONS: TransitionTable<ControlPhase> = {
  hello: ['proven'],
  proven: ['welcomed', 'closed'],
  welcomed: ['optioned'],
  optioned: ['started', 'closed'],
  started: ['answered', 'closed'],
  answered: ['closed'],
  closed: [],
};

/** What each phase reads next (nothing: it answers at once), and whether the handshake timeout bounds the wait. */
const ACCEPTS = {
  hello: { types: ['auth'], bounded: true },
  proven: { types: [], bounded: false },
  welcomed: { types: ['options'], bounded: true },
  optioned: { types: ['have', 'prefetch', 'start', 'bye'], bounded: true },
  started: { types: ['done', 'bye', 'background', 'installed', 'running', 'dropped'], bounded: false },
  answered: { types: ['bye', 'installed'], bounded: false },
  closed: { types: [], bounded: false },
} as const satisfies Record<ControlPhase, { types: readonly MessageType[]; bounded: boolean }>;

type Accepted<P extends ControlPhase> = MessageOf<(typeof ACCEPTS)[P]['types'][number]>;

/** What a conversation needs of its page server. */
export interface ControlHost {
  readonly image: Image;
  readonly token: string | undefined;
  /** The image's content digest, for every welcome (null: none; taken once the server listens). */
  content(): string | null;
  readonly maxFrame: number;
  readonly handshakeTimeoutMs: number;
  readonly heartbeat: Heartbeat;
  readonly plaintextTcp: boolean;
  readonly release: ReleaseAsSent | null;
  readonly live: LiveServing | null;
  readonly log: Logger;
  /** The connection authenticated: out of the unproven ones' limits. */
  proven(socket: Socket): void;
  /** The session this connection drives: the paused one it resumes, or a new one. */
  sessionFor(resume: unknown): SourceSession;
  /**
   * `socket` is `session`'s control channel now; when it closes, `saidBye`
   * tells whether the destination said bye, and `answered` whether it was
   * sent its digest (which a cut link may not have let through).
   */
  controlOpened(session: SourceSession, socket: Socket, saidBye: () => boolean, answered: () => boolean): void;
  error(code: string): void;
}

export class ControlConversation {
  readonly #host: ControlHost;
  readonly #socket: Socket;
  readonly #reader: FrameReader;
  /** From `proven` on (before, the connection is one of the unproven, counted in a summary, never logged alone). */
  #machine: StateMachine<ControlPhase> | null = null;
  readonly #helloNonce: Uint8Array;
  readonly #nonce = newNonce();
  #probe = false;
  /** It named a session to resume (one this process may never have seen). */
  #resuming = false;
  #session: SourceSession | null = null;
  #keys: DataChannelKeys | undefined;
  #options: { transfer: TransferOptions; units: number[]; precopy: boolean; discardMarks: boolean; packRuns: boolean } | null = null;
  /** A held-pages bitmap too large for one frame comes first in pieces (`have`), then `start`. */
  readonly #have = new Map<number, { region: number; bitmap: Uint8Array }>();
  readonly #prefetch: Uint8Array[] = [];
  #prefetchEntries = 0;
  #saidBye = false;

  constructor(host: ControlHost, socket: Socket, reader: FrameReader, hello: MessageOf<'hello'>) {
    if (hello.protocol !== PROTOCOL_VERSION)
      throw new PostcopyError(ErrorCode.PROTOCOL_VERSION, `protocol ${hello.protocol} is not supported (this server speaks ${PROTOCOL_VERSION})`);
    if (!(hello.nonce instanceof Uint8Array) || hello.nonce.length !== 32)
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'hello without a 32-byte nonce');
    this.#host = host;
    this.#socket = socket;
    this.#reader = reader;
    this.#helloNonce = hello.nonce;
  }

  get phase(): ControlPhase {
    return this.#machine?.state ?? 'hello';
  }

  /** Runs the conversation to its end; throws (a coded error) when it breaks. */
  async run(): Promise<void> {
    const token = this.#host.token;
    send(this.#socket, {
      t: 'challenge',
      protocol: PROTOCOL_VERSION,
      software: SOFTWARE,
      nonce: this.#nonce,
      auth: token ? 'token' : 'none',
      ...(token ? { proof: proveToken(token, 'server', this.#nonce, this.#helloNonce) } : {}),
    });
    while (this.phase !== 'closed') {
      const { types, bounded } = ACCEPTS[this.phase];
      const msg = types.length > 0 ? await this.#reader.next(types, bounded ? this.#host.handshakeTimeoutMs : 0) : null;
      await this.#handle(msg);
    }
  }

  #handle(msg: MessageOf<MessageType> | null): void | Promise<void> {
    switch (this.phase) {
      case 'hello':
        return this.#onAuth(msg as Accepted<'hello'>);
      case 'proven':
        return this.#welcome();
      case 'welcomed':
        return this.#onOptions(msg as Accepted<'welcomed'>);
      case 'optioned':
        return this.#beforeStart(msg as Accepted<'optioned'>);
      case 'started':
        return this.#whileServing(msg as Accepted<'started'>);
      case 'answered':
        return this.#afterDigest(msg as Accepted<'answered'>);
    }
  }

  #to(phase: ControlPhase, details: Record<string, unknown> = {}): void {
    this.#machine!.to(phase, details);
  }

  #onAuth(auth: Accepted<'hello'>): void {
    const token = this.#host.token;
    if (token && !proofMatches(proveToken(token, 'client', this.#nonce, this.#helloNonce), auth.proof))
      throw new PostcopyError(ErrorCode.AUTH_FAILED, 'the token proof does not match');
    this.#host.proven(this.#socket);
    this.#probe = auth.probe === true;
    this.#resuming = auth.resume !== undefined;
    // A destination checking that we answer and that the tokens agree gets no session.
    if (!this.#probe) this.#session = this.#host.sessionFor(auth.resume);
    const details = this.#probe ? { probe: true } : { session: this.#session!.id };
    this.#machine = new StateMachine<ControlPhase>('control', 'proven', TRANSITIONS, this.#host.log.child(details));
  }

  #welcome(): void {
    const host = this.#host;
    const image = host.image;
    const content = host.content();
    const identity = { fingerprint: image.fingerprint, ...(content ? { content } : {}) };
    if (this.#probe) {
      send(this.#socket, { t: 'ready', ...identity, regions: welcomeRegions(image) });
      this.#socket.end();
      // A prober that never closes its side does not hold the socket forever.
      setTimeout(() => this.#socket.destroy(), host.handshakeTimeoutMs).unref();
      return this.#to('closed', { probe: true });
    }
    const session = this.#session!;
    host.controlOpened(
      session,
      this.#socket,
      () => this.#saidBye,
      () => this.#saidBye || this.phase === 'answered',
    );
    // TCP leaves the host: its data channels carry sealed records (a TCP source always holds a token).
    this.#keys = this.#socket.remoteFamily && host.token && !host.plaintextTcp ? dataChannelKeys(host.token, this.#nonce, this.#helloNonce) : undefined;
    // On this host (a unix socket) and with an image in shared memory, the destination may take the memory itself.
    session.memoryOffered = !this.#socket.remoteFamily && image.memoryFds() !== null;
    const { memory, ...dataTickets } = session.tickets;
    send(this.#socket, {
      t: 'welcome',
      session: session.id,
      resumed: session.resumes > 0,
      ...identity,
      encryption: this.#keys ? 'aes-256-gcm' : 'none',
      regions: welcomeRegions(image),
      tickets: session.memoryOffered ? { ...dataTickets, memory } : dataTickets,
      limits: { maxFrame: host.maxFrame, maxRunBytes: MAX_RUN_BYTES },
      capabilities: [
        ...CAPABILITIES,
        ...(session.memoryOffered ? ['in-place'] : []),
        ...(host.release ? ['release-as-sent'] : []),
        ...(host.live ? ['precopy'] : []),
      ],
    });
    keepAlive(this.#socket, this.#reader, host.heartbeat);
    this.#to('welcomed');
  }

  #onOptions(msg: Accepted<'welcomed'>): void {
    const transfer = checkOptions(msg);
    const units = checkPageSizes(msg.pageSizes, this.#host.image.regions);
    const packRuns = Array.isArray(msg.packedRuns) && msg.packedRuns.includes('zstd') && native.packingAvailable();
    this.#options = { transfer, units, precopy: msg.precopy === true, discardMarks: msg.discardMarks === true, packRuns };
    this.#to('optioned');
  }

  async #beforeStart(msg: Accepted<'optioned'>): Promise<void> {
    const regions = this.#host.image.regions;
    if (msg.t === 'bye') {
      // Done before any page flowed (it took the image in place, or changed its mind).
      return this.#bye();
    }
    if (msg.t === 'prefetch') {
      // A working set to stream ahead of the background: at most one entry per page of the image.
      const entries = checkPrefetch(msg, regions);
      this.#prefetchEntries += entries.length / 8;
      if (this.#prefetchEntries > regions.reduce((n, r) => n + r.length / r.pageSize, 0))
        throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'a working set with more entries than the image has pages');
      this.#prefetch.push(entries);
      return;
    }
    if (msg.t === 'have') {
      const chunk = checkHaveChunk(msg, regions);
      const r = regions[chunk.region];
      let whole = this.#have.get(chunk.region);
      if (!whole) this.#have.set(chunk.region, (whole = { region: chunk.region, bitmap: new Uint8Array(Math.ceil(r.length / r.pageSize / 8)) }));
      for (let i = 0; i < chunk.bitmap.length; i++) whole.bitmap[chunk.offset + i] |= chunk.bitmap[i];
      return;
    }
    await this.#start(msg);
  }

  async #start(msg: MessageOf<'start'>): Promise<void> {
    const { release, live } = this.#host;
    const session = this.#session!;
    const options = this.#options!;
    const have = [...this.#have.values()].concat(checkHave(msg.have, this.#host.image.regions));
    release?.admitHolder(session, have);
    const precopy = live !== null && (await live.beforeStart(options.precopy));
    session.start({
      transfer: options.transfer,
      have,
      ...(this.#keys ? { keys: this.#keys } : {}),
      prefetch: this.#prefetch,
      units: options.units,
      ...(precopy ? { onPrecopyEvent: (event) => live.migration.onSessionEvent(event), discardMarks: options.discardMarks } : {}),
      unconfirmedBudget: release ? release.budgetPages : 0,
      packRuns: options.packRuns,
    });
    send(this.#socket, { t: 'started' });
    live?.started(session, precopy, this.#resuming, (e) => this.#liveFailed(e));
    this.#to('started');
  }

  #liveFailed(e: CodedError): void {
    this.#host.error(e.code);
    sendErrorAndClose(this.#socket, e.code, e.message);
  }

  async #whileServing(msg: Accepted<'started'>): Promise<void> {
    const session = this.#session!;
    const { live, image, log } = this.#host;
    switch (msg.t) {
      case 'bye':
        return this.#bye();
      case 'running':
        if (!live) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'running goes to a live source');
        return live.running();
      case 'dropped':
        if (!live) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'dropped goes to a live source');
        if (!Number.isInteger(msg.round) || msg.round < 1) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'dropped names a discard round by its number');
        return live.migration.discardsDropped(msg.round);
      case 'installed':
        return this.#installed(msg);
      case 'background':
        return session.startBackground();
      case 'done': {
        // One `done` per connection (a destination asks again only on a new one): the digest and the checksums are work, and a peer must not be able to ask for them without end.
        const verify = checkVerify(msg.verify, image.regions);
        session.complete();
        log.info({ session: session.id, destination: msg.stats }, 'destination reports every page resident');
        this.#to('answered');
        send(this.#socket, { t: 'digest', ...(await image.answerDone(verify)), stats: { ...session.stats() } });
        // A live workload leaves once the destination says bye: that proves the digest reached it (a link cut
        // now would otherwise leave it asking, resume after resume, a source that has exited).
        return;
      }
    }
  }

  #afterDigest(msg: Accepted<'answered'>): void {
    if (msg.t === 'bye') return this.#bye();
    this.#installed(msg);
  }

  #installed(msg: MessageOf<'installed'>): void {
    const release = this.#host.release;
    if (!release) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'installed reports go to a source that releases as sent');
    release.installed(this.#session!, msg);
  }

  #bye(): void {
    const answered = this.phase === 'answered';
    this.#saidBye = true;
    this.#socket.end();
    this.#to('closed', { by: 'bye' });
    // Release-as-sent: the destination holds every page and had its digest; nothing is left to serve.
    this.#host.release?.saidBye(this.#session!, answered);
    if (answered) this.#host.live?.answered();
  }
}

/** What every welcome offers, beyond what depends on the connection and the image. */
const CAPABILITIES = [
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
];

function welcomeRegions(image: Image): RegionInfo[] {
  return image.regions.map(({ id, name, length, pageSize, contentLength }) => ({ id, name, length, pageSize, contentLength }));
}
