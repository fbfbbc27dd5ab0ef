// Feeds a store image's engine (addon/store_supply.h): takes the pieces it
// wants, fetches their chunks (through the host's chunk cache, each checked
// against its name) and installs them. Pieces the host's cache holds the
// engine reads itself (its fault thread, or takeStorePieces). The pieces faults wait on are fetched
// the moment they are wanted, however many; the working set and the
// background go `parallel` pieces at a time, enough to fill the link. A
// store that fails (timeouts, resets, 5xx, throttling, through the client's
// own retries) is an outage: each piece is tried again with backoff and
// jitter until the store answers (or the session gives up); what cannot get
// better by asking again (a missing or damaged chunk, refused credentials)
// ends the session.
import { EventEmitter } from 'node:events';
import { ErrorCode, asCodedError, type CodedError } from '../lib/errors.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import type { StorePiece } from '../lib/native.js';
import { Reason } from '../lib/wire.js';
import type { ChunkCache } from '../lib/store/chunk-cache.js';
import type { Manifest } from '../lib/store/manifest.js';
import type { SnapshotStore } from '../lib/store/snapshot-store.js';
import type { FaultEngine } from './fault-engine.js';

/** Zero chunks and pieces the host's cache holds go in on the event loop's thread: this many bytes a turn at most (a few milliseconds). */
const INSTALL_HERE_BYTES = 8 << 20;

/**
 * While faults are being served (a fault's piece in flight, or one done this
 * recently), what is fetched ahead (working set, background) is held to
 * AHEAD_DURING_DEMAND pieces in flight: a store shares its CPUs among the
 * requests it holds, so a fault's GET behind a hundred others waits for them
 * all. A session starts so (its workload's first faults come at once), and
 * each DEMAND_ACTIVE_MS with no fault doubles what may be in flight, up to
 * `parallel`.
 */
const AHEAD_DURING_DEMAND = 4;
const DEMAND_ACTIVE_MS = 5;

/** What asking again cannot change. */
const FINAL = new Set<string>([ErrorCode.STORE_NOT_FOUND, ErrorCode.STORE_CORRUPT, ErrorCode.STORE_DENIED]);

export interface StoreFeederOptions {
  /** Working-set and background pieces in flight (default 16). */
  parallel?: number;
  /** The working set and the background at most this many bytes a second (0: no limit); the pieces faults wait on never wait for it. */
  rateBytesPerSecond?: number;
  /** Backoff between attempts at a piece while the store is out of reach (default 100 ms doubling to 5 s). */
  retryDelayMs?: { initial: number; max: number };
  logger?: Logger;
}

export interface StoreFeederStats {
  pieces: number;
  chunks: number;
  zeroChunks: number;
  /** Attempts at a piece that failed and were tried again. */
  retries: number;
  /** Times the fetches ahead were held to AHEAD_DURING_DEMAND because faults were being served. */
  aheadHeldForFaults: number;
}

/** Events: 'outage' (CodedError): the store stopped answering; 'recovered' ({outageMs}); 'failed' (CodedError): final. */
export class StoreFeeder extends EventEmitter {
  readonly stats: StoreFeederStats = { pieces: 0, chunks: 0, zeroChunks: 0, retries: 0, aheadHeldForFaults: 0 };
  readonly #engine: FaultEngine;
  readonly #store: SnapshotStore;
  readonly #manifest: Manifest;
  readonly #cache: ChunkCache | undefined;
  readonly #log: Logger;
  readonly #parallel: number;
  readonly #retry: { initial: number; max: number };
  #ahead = 0;
  /** Pieces faults wait on, in flight; and when the last one was taken or came (performance.now()). */
  #urgent = 0;
  #lastUrgentAt = -Infinity;
  /** A pump after faults go quiet, to open the fetches ahead up again. */
  #afterDemand: NodeJS.Timeout | null = null;
  /** Pieces that may be fetched ahead at once now, and when it last doubled. */
  #aheadLimit = AHEAD_DURING_DEMAND;
  #openedAt = 0;
  readonly #rate: number;
  /** Rate-limited: when the next piece fetched ahead may start. */
  #nextAheadAt = 0;
  #stopped = false;
  #outageSince = 0;
  readonly #timers = new Set<NodeJS.Timeout>();
  #soon: NodeJS.Immediate | null = null;
  readonly #onWanted = () => this.#pump();

  constructor(engine: FaultEngine, store: SnapshotStore, manifest: Manifest, cache: ChunkCache | undefined, options: StoreFeederOptions = {}) {
    super();
    this.#engine = engine;
    this.#store = store;
    this.#manifest = manifest;
    this.#cache = cache;
    this.#log = options.logger ?? silentLogger;
    this.#parallel = options.parallel ?? 16;
    this.#retry = options.retryDelayMs ?? { initial: 100, max: 5000 };
    this.#rate = options.rateBytesPerSecond ?? 0;
  }

  start(): void {
    this.#lastUrgentAt = this.#openedAt = performance.now();
    this.#engine.on('store-wanted', this.#onWanted);
    this.#pump();
  }

  /** Tops the working set and the background up again (e.g. once it was started). */
  pump(): void {
    this.#pump();
  }

  stop(): void {
    this.#stopped = true;
    this.#engine.off('store-wanted', this.#onWanted);
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    if (this.#soon) clearImmediate(this.#soon);
    this.#soon = null;
    if (this.#afterDemand) clearTimeout(this.#afterDemand);
    this.#afterDemand = null;
  }

  get outage(): boolean {
    return this.#outageSince !== 0;
  }

  #pump(): void {
    if (this.#stopped) return;
    // During an outage the pieces already in flight are retried; no more are taken ahead.
    const limit = this.#aheadRoom();
    if (limit < this.#parallel && this.#ahead >= limit) this.stats.aheadHeldForFaults++;
    const room = this.#outageSince ? 0 : Math.max(0, limit - this.#ahead);
    const { pieces, fromCache } = this.#engine.takeStorePieces(room, INSTALL_HERE_BYTES);
    // Zero chunks and pieces the host's cache held went in at once: the next ones are taken on the next turn of the loop.
    if (fromCache > 0) this.#pumpSoon();
    for (const piece of pieces) {
      const ahead = piece.why === Reason.prefetch || piece.why === Reason.background;
      if (ahead) this.#ahead++;
      else {
        this.#urgent++;
        this.#lastUrgentAt = performance.now();
      }
      void this.#paced(piece, ahead)
        .then(() => this.#feed(piece, 0))
        .finally(() => {
          if (ahead) this.#ahead--;
          else {
            this.#urgent--;
            this.#lastUrgentAt = performance.now();
          }
          this.#pump();
        });
    }
    if (limit < this.#parallel) this.#pumpAfterDemand();
  }

  /** What may be fetched ahead at once now: AHEAD_DURING_DEMAND while faults are served, doubling each quiet DEMAND_ACTIVE_MS. */
  #aheadRoom(): number {
    const now = performance.now();
    if (this.#urgent > 0 || now - this.#lastUrgentAt < DEMAND_ACTIVE_MS) {
      this.#aheadLimit = AHEAD_DURING_DEMAND;
      this.#openedAt = now;
    } else if (now - this.#openedAt >= DEMAND_ACTIVE_MS) {
      this.#aheadLimit = Math.min(this.#parallel, this.#aheadLimit * 2);
      this.#openedAt = now;
    }
    return Math.min(this.#parallel, this.#aheadLimit);
  }

  /** Pumps again once faults have been quiet for DEMAND_ACTIVE_MS (the fetches ahead open up then). */
  #pumpAfterDemand(): void {
    if (this.#afterDemand || this.#stopped) return;
    this.#afterDemand = setTimeout(() => {
      this.#afterDemand = null;
      this.#pump();
    }, DEMAND_ACTIVE_MS + 1);
  }

  #pumpSoon(): void {
    if (this.#soon) return;
    this.#soon = setImmediate(() => {
      this.#soon = null;
      this.#pump();
    });
  }

  /** A piece fetched ahead waits its turn under the rate limit. */
  async #paced(piece: StorePiece, ahead: boolean): Promise<void> {
    if (!ahead || this.#rate <= 0) return;
    const now = Date.now();
    const at = Math.max(now, this.#nextAheadAt);
    this.#nextAheadAt = at + ((piece.sourceCount * this.#manifest.regions[piece.sourceRegion].pageSize) / this.#rate) * 1000;
    if (at > now) await this.#sleep(at - now);
  }

  #sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.#timers.delete(timer);
        resolve();
      }, ms);
      this.#timers.add(timer);
    });
  }

  /** Fetches a piece and installs it; while the store is out of reach, again after the backoff. */
  async #feed(piece: StorePiece, attempt: number): Promise<void> {
    for (;;) {
      if (this.#stopped) return;
      try {
        const data = await this.#fetch(piece);
        if (this.#stopped) return;
        this.#engine.installPiece(piece, data);
        this.stats.pieces++;
        this.#recovered();
        return;
      } catch (err) {
        if (this.#stopped) return;
        const e = asCodedError(err);
        if (FINAL.has(e.code) || !e.code.startsWith('ERR_STORE')) {
          this.#log.error({ code: e.code, err: e.message, region: piece.sourceRegion, page: piece.sourceFirst }, 'a piece of the image cannot be had');
          this.emit('failed', e);
          return;
        }
        this.#outage(e);
        this.stats.retries++;
        const delay = Math.min(this.#retry.max, this.#retry.initial * 2 ** Math.min(attempt++, 30));
        await this.#sleep(delay * (0.5 + Math.random() / 2)); // jitter: many pieces do not come back at once
      }
    }
  }

  /** The bytes of the piece's source pages (null: all zeros), from its chunks. */
  async #fetch(piece: StorePiece): Promise<Buffer | null> {
    const region = this.#manifest.regions[piece.sourceRegion];
    const start = piece.sourceFirst * region.pageSize;
    const end = start + piece.sourceCount * region.pageSize;
    const first = Math.floor(start / region.chunkBytes);
    const last = Math.floor((end - 1) / region.chunkBytes);
    const hashes = region.chunks.slice(first, last + 1);
    if (hashes.every((h) => h === '')) {
      this.stats.zeroChunks += hashes.length;
      return null;
    }
    const contents = await Promise.all(
      hashes.map(async (hash, i) => {
        if (!hash) {
          this.stats.zeroChunks++;
          return null;
        }
        const content = await this.#store.chunk(hash, this.#cache);
        const at = (first + i) * region.chunkBytes;
        const want = Math.min(region.chunkBytes, region.length - at);
        if (content.length !== want) {
          throw Object.assign(new Error(`chunk ${hash.slice(0, 16)} holds ${content.length} bytes where the manifest needs ${want}`), {
            code: ErrorCode.STORE_CORRUPT,
          });
        }
        this.stats.chunks++;
        return content;
      }),
    );
    // One chunk that is the piece: installed as it is.
    if (contents.length === 1 && first * region.chunkBytes === start && contents[0]!.length === end - start) return contents[0];
    const out = Buffer.alloc(end - start);
    contents.forEach((content, i) => {
      if (!content) return;
      const at = (first + i) * region.chunkBytes;
      const from = Math.max(start, at);
      const to = Math.min(end, at + content.length);
      content.copy(out, from - start, from - at, to - at);
    });
    return out;
  }

  #outage(e: CodedError): void {
    if (this.#outageSince) return;
    this.#outageSince = Date.now();
    this.#log.warn({ code: e.code, err: e.message }, 'the store is out of reach: retrying');
    this.emit('outage', e);
  }

  #recovered(): void {
    if (!this.#outageSince) return;
    const outageMs = Date.now() - this.#outageSince;
    this.#outageSince = 0;
    this.#log.info({ outageMs }, 'the store answers again');
    this.emit('recovered', { outageMs });
    this.#pump();
  }
}
