// One destination's session on the source: its state machine, its data
// channels, and the native page-server threads that serve it.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { closeSync } from 'node:fs';
import { native, type NativeEvent, type NativePageServerSession, type SourceStats } from '../lib/native.js';
import { ErrorCode, PostcopyError, asErrorCode } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import type { Image } from './image.js';

export type SessionState = 'setup' | 'active' | 'completed' | 'failed' | 'closed';
export type Channel = 'urgent' | 'bulk';

export interface TransferOptions {
  /** Pages sent after each requested page, and before it. */
  window: { forward: number; backward: number };
  /** Stream every page not yet sent; 0 bytes/s means unlimited. */
  background: { enabled: boolean; rateBytesPerSecond: number };
}

export const MAX_WINDOW = 1024;

export class SourceSession {
  readonly id = randomBytes(16).toString('hex');
  readonly tickets: Record<Channel, Buffer> = { urgent: randomBytes(32), bulk: randomBytes(32) };
  readonly startedAt = Date.now();
  #state: SessionState = 'setup';
  #fds: Partial<Record<Channel, number>> = {};
  #native: NativePageServerSession | null = null;
  #lastStats: SourceStats | null = null;
  readonly #image: Image;
  readonly #log: Logger;
  readonly #onFailure: (err: PostcopyError) => void;

  constructor(image: Image, log: Logger, onFailure: (err: PostcopyError) => void) {
    this.#image = image;
    this.#log = log.child({ session: this.id });
    this.#onFailure = onFailure;
    this.#log.info({ state: 'setup' }, 'session state');
  }

  get state(): SessionState {
    return this.#state;
  }

  /** Checks a data channel's ticket; throws unless this channel may attach now. */
  verifyAttach(channel: Channel, ticket: unknown): void {
    if (this.#state !== 'setup') throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `cannot attach a channel to a session that is ${this.#state}`);
    if (this.#fds[channel] !== undefined) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `the ${channel} channel is already attached`);
    const expected = this.tickets[channel];
    if (!(ticket instanceof Uint8Array) || ticket.length !== expected.length || !timingSafeEqual(expected, ticket)) {
      throw new PostcopyError(ErrorCode.AUTH_FAILED, `wrong ticket for the ${channel} channel`);
    }
  }

  /** Takes ownership of a verified data channel's fd. */
  adoptChannel(channel: Channel, fd: number): void {
    if (this.#state !== 'setup' || this.#fds[channel] !== undefined) {
      closeSync(fd);
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `the ${channel} channel can no longer attach`);
    }
    this.#fds[channel] = fd;
    this.#log.debug({ channel }, 'data channel attached');
  }

  /** Starts the native threads; `have` lists pages the destination already holds. */
  start(options: TransferOptions, have: { region: number; bitmap: Uint8Array }[] = []): void {
    if (this.#fds.urgent === undefined || this.#fds.bulk === undefined) {
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'start before both data channels were attached');
    }
    const urgentFd = this.#fds.urgent;
    const bulkFd = this.#fds.bulk;
    this.#fds = {};
    try {
      this.#native = new native.PageServerSession({
      regions: this.#image.regions.map((r) => r.spec),
      urgentFd,
      bulkFd,
      windowForward: options.window.forward,
      windowBackward: options.window.backward,
      background: options.background.enabled,
      rateBytesPerSecond: options.background.rateBytesPerSecond,
        onEvent: (event) => this.#onNativeEvent(event),
      });
    } catch (err) {
      closeSync(urgentFd);
      closeSync(bulkFd);
      throw err;
    }
    for (const h of have) this.#native.markSent(h.region, h.bitmap);
    this.#native.start();
    this.#transition('active', { options, resumedRegions: have.length });
  }

  stats(): SourceStats | null {
    return this.#native ? this.#native.stats() : this.#lastStats;
  }

  complete(): void {
    if (this.#state === 'active') this.#transition('completed', { stats: this.stats() });
  }

  /** Stops the threads and closes every fd; idempotent. */
  close(reason: string): void {
    if (this.#native) {
      this.#native.stop(); // joins the threads, so the final figures are complete
      this.#lastStats = this.#native.stats();
      this.#native = null;
    }
    for (const fd of Object.values(this.#fds)) closeSync(fd);
    this.#fds = {};
    if (this.#state !== 'closed') this.#transition('closed', { reason, stats: this.#lastStats });
  }

  #onNativeEvent(event: NativeEvent): void {
    try {
      if (event.type === 'background-done') {
        this.#log.info({ afterMs: Math.round((this.#native?.stats().backgroundDoneNs ?? 0) / 1e6) }, 'background transfer sent every page');
        return;
      }
      // The destination leaving (EOF, or a write that finds it gone) ends the
      // session when its control channel closes; only violations fail it.
      const departure = event.type === 'closed' || ['EPIPE', 'ECONNRESET'].includes(event.code ?? '');
      if (departure) {
        this.#log.info({ channel: event.channel, code: event.code }, 'the destination closed a data channel');
        return;
      }
      const code = asErrorCode(event.code, ErrorCode.PEER_GONE);
      const err = new PostcopyError(code, event.message ?? event.type, { channel: event.channel, native: event.code });
      if (this.#state === 'active') this.#transition('failed', { code: err.code, channel: event.channel, error: err.message });
      this.#onFailure(err);
    } catch (err) {
      this.#log.error({ err }, 'handling a native event failed');
    }
  }

  #transition(to: SessionState, details: Record<string, unknown> = {}): void {
    const from = this.#state;
    this.#state = to;
    this.#log.info({ from, state: to, ...details }, 'session state');
  }
}
