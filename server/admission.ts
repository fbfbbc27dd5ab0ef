// Admission of connections that have not authenticated yet. Anyone who can
// reach the socket can open them (a local user on TCP loopback, anyone on the
// network with tcp:0.0.0.0), so they must never starve destinations that hold
// the token:
// - each must prove itself (token, or a data channel's ticket) within a short
//   deadline, else it is closed with ERR_TIMEOUT;
// - there are at most MAX_UNPROVEN_CONNECTIONS in all, and (TCP) at most
//   MAX_UNPROVEN_PER_PEER from one peer address; a newcomer over either limit
//   makes room by closing the oldest unauthenticated connection (of its own
//   address, else of the address holding the most) with ERR_SOURCE_BUSY,
//   never by being refused: a destination mid-handshake is young, a flood's
//   connections grow old;
// - what is turned away is logged as one summary line per interval, with
//   counts, never one line per connection.
import type { Socket } from 'node:net';
import { ErrorCode } from '../lib/errors.js';
import { encodeFrame } from '../lib/protocol.js';
import type { Logger } from '../lib/logger.js';

/** The most connections that may be waiting to authenticate at once; a newcomer closes the oldest. */
export const MAX_UNPROVEN_CONNECTIONS = 256;
/** The most of them from one peer address (TCP; a unix socket's peers are this user's own, 0600). */
export const MAX_UNPROVEN_PER_PEER = 32;
/** A connection has this long to authenticate, all steps together (PageServerOptions.authTimeoutMs). */
export const DEFAULT_AUTH_TIMEOUT_MS = 5000;
/** At most one summary line of connections turned away per this interval. */
export const ADMISSION_LOG_INTERVAL_MS = 5000;

interface Pending {
  peer: string;
  timer: NodeJS.Timeout;
}

export class Admission {
  /** Connections still to authenticate, oldest first (a Map keeps insertion order). */
  readonly #pending = new Map<Socket, Pending>();
  readonly #perPeer = new Map<string, number>();
  readonly #log: Logger;
  readonly #authTimeoutMs: number;
  /** Counts each connection turned away by its code (the server's error figures). */
  readonly #count: (code: string) => void;
  /** Turned away since the last summary line: by reason, and by peer. */
  #reasons = new Map<string, number>();
  #peers = new Map<string, number>();
  #summary: NodeJS.Timeout | null = null;

  constructor(options: { logger: Logger; authTimeoutMs?: number; count: (code: string) => void }) {
    this.#log = options.logger;
    this.#authTimeoutMs = options.authTimeoutMs ?? DEFAULT_AUTH_TIMEOUT_MS;
    this.#count = options.count;
  }

  /** Connections still to authenticate. */
  get size(): number {
    return this.#pending.size;
  }

  /** Takes a new connection in, first closing the oldest unauthenticated one when a limit is reached. */
  admit(socket: Socket): void {
    const peer = socket.remoteAddress ?? 'unix';
    if (peer !== 'unix' && (this.#perPeer.get(peer) ?? 0) >= MAX_UNPROVEN_PER_PEER) this.#evictOldest(peer);
    else if (this.#pending.size >= MAX_UNPROVEN_CONNECTIONS) this.#evictOldest(this.#busiestPeer());
    const timer = setTimeout(() => this.#timeOut(socket), this.#authTimeoutMs);
    timer.unref();
    this.#pending.set(socket, { peer, timer });
    this.#perPeer.set(peer, (this.#perPeer.get(peer) ?? 0) + 1);
    socket.once('close', () => this.proven(socket));
  }

  /** The connection proved itself (or closed): it no longer counts. */
  proven(socket: Socket): void {
    const entry = this.#pending.get(socket);
    if (!entry) return;
    this.#pending.delete(socket);
    clearTimeout(entry.timer);
    const left = (this.#perPeer.get(entry.peer) ?? 1) - 1;
    if (left > 0) this.#perPeer.set(entry.peer, left);
    else this.#perPeer.delete(entry.peer);
  }

  /** Still to authenticate. */
  pending(socket: Socket): boolean {
    return this.#pending.has(socket);
  }

  /** A connection that failed before it proved itself: anyone can cause that, so it goes in the summary, not a line of its own. */
  failed(socket: Socket, code: string): void {
    const entry = this.#pending.get(socket);
    this.#note(entry?.peer ?? socket.remoteAddress ?? 'unix', code);
  }

  /** Stops the timers; what was turned away since the last summary is logged now. */
  close(): void {
    for (const { timer } of this.#pending.values()) clearTimeout(timer);
    this.#pending.clear();
    this.#perPeer.clear();
    this.#logSummary();
    if (this.#summary) clearInterval(this.#summary);
    this.#summary = null;
  }

  #busiestPeer(): string {
    let busiest = '';
    let most = -1;
    for (const [peer, n] of this.#perPeer) {
      if (n > most) [busiest, most] = [peer, n];
    }
    return busiest;
  }

  #evictOldest(peer: string): void {
    for (const [socket, entry] of this.#pending) {
      if (entry.peer !== peer) continue;
      this.#turnAway(
        socket,
        ErrorCode.SOURCE_BUSY,
        `the source is busy: ${this.#pending.size} connections are still to authenticate, and this one, among the oldest, was closed to make room; try again`,
      );
      return;
    }
  }

  #timeOut(socket: Socket): void {
    if (!this.#pending.has(socket)) return;
    this.#turnAway(socket, ErrorCode.TIMEOUT, `no authentication within ${this.#authTimeoutMs} ms`);
  }

  #turnAway(socket: Socket, code: string, message: string): void {
    const peer = this.#pending.get(socket)?.peer ?? 'unix';
    this.proven(socket);
    this.#note(peer, code);
    // Written at once (a small frame on a socket nobody reads from yet goes to the kernel in the call), then closed: a flood holds no fd longer.
    if (!socket.destroyed) socket.write(encodeFrame({ t: 'error', code, message }));
    socket.destroy();
  }

  #note(peer: string, code: string): void {
    this.#count(code);
    this.#reasons.set(code, (this.#reasons.get(code) ?? 0) + 1);
    this.#peers.set(peer, (this.#peers.get(peer) ?? 0) + 1);
    if (!this.#summary) {
      this.#summary = setInterval(() => this.#logSummary(), ADMISSION_LOG_INTERVAL_MS);
      this.#summary.unref();
    }
  }

  /** One line for everything turned away since the last one; the interval stops once nothing more comes. */
  #logSummary(): void {
    if (this.#reasons.size === 0) {
      if (this.#summary) clearInterval(this.#summary);
      this.#summary = null;
      return;
    }
    const peers = [...this.#peers].sort((a, b) => b[1] - a[1]);
    this.#log.warn(
      {
        turnedAway: Object.fromEntries(this.#reasons),
        peers: Object.fromEntries(peers.slice(0, 5)),
        otherPeers: Math.max(0, peers.length - 5),
        unproven: this.#pending.size,
        intervalMs: ADMISSION_LOG_INTERVAL_MS,
      },
      'connections turned away before they authenticated',
    );
    this.#reasons = new Map();
    this.#peers = new Map();
  }
}
