// Feeds a store image's engine (addon/store_supply.h): takes the pieces it
// wants, fetches their chunks (through the host's chunk cache, each checked
// against its name) and installs them; where the engine fetches itself, it
// hands it each group taken ahead, and fetches only what comes back. Pieces the host's cache holds the
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
import { liesAfter, placesOf, type ChunkPlace, type Manifest } from '../lib/store/manifest.js';
import type { SnapshotStore } from '../lib/store/snapshot-store.js';
import type { FaultEngine } from './fault-engine.js';

/** Zero chunks and pieces the host's cache holds go in on the event loop's thread: this many bytes a turn at most (a few milliseconds). */
const INSTALL_HERE_BYTES = 8 << 20;

/**
 * While faults are being served (a fault's piece in flight, or one done this
 * recently), what is fetched ahead (working set, background) is held to
 * AHEAD_DURING_DEMAND fetches in flight: a store shares its CPUs among the
 * requests it holds, so a fault's GET behind a hundred others waits for them
 * all. A fetch of the working set is then a run of the set's neighbours in
 * the image (up to PIECES_PER_FETCH pieces, one ranged GET): what the
 * workload faults on next, at a sixteenth of the requests; one of the
 * background is one piece. A session starts so (its workload's first faults come at once), and
 * each DEMAND_ACTIVE_MS with no fault doubles what may be in flight, up to
 * `parallel`.
 */
const AHEAD_DURING_DEMAND = 4;
const DEMAND_ACTIVE_MS = 5;
/**
 * Once a recorded working set is all taken, what faults still come are the
 * pages no record foresaw (each a GET the workload waits for, one after
 * another), and the background is unlikely to fetch one of them first: while
 * they are served it is held to one fetch, so each waits behind one GET in the
 * store, not four.
 */
const AHEAD_AFTER_SET = 1;
/**
 * With no fault being served, neighbouring pieces ahead whose chunks lie one
 * after another in a pack go as one fetch (one ranged GET), up to this many
 * (`parallel` still counts pieces: as many bytes in flight, fewer requests).
 * While faults are served, the background's go one each, so a fault's GET
 * never waits behind a large one of what it may never touch.
 */
const PIECES_PER_FETCH = 16;

/** A piece fetched ahead of any fault: the working set's or the background's. */
function isAhead(piece: StorePiece): boolean {
  return piece.why === Reason.prefetch || piece.why === Reason.background;
}

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
  /** Times the background was held to AHEAD_DURING_DEMAND (AHEAD_AFTER_SET after a working set) fetches because faults were being served. */
  aheadHeldForFaults: number;
  /** The most fetches of the working set under way at once (handed to the engine or fetched here): `parallel` pieces at most, faults served or not. */
  mostSetInFlight: number;
}

/** Events: 'outage' (CodedError): the store stopped answering; 'recovered' ({outageMs}); 'failed' (CodedError): final. */
export class StoreFeeder extends EventEmitter {
  readonly stats: StoreFeederStats = { pieces: 0, chunks: 0, zeroChunks: 0, retries: 0, aheadHeldForFaults: 0, mostSetInFlight: 0 };
  readonly #engine: FaultEngine;
  readonly #store: SnapshotStore;
  readonly #manifest: Manifest;
  readonly #places: Map<string, ChunkPlace>;
  readonly #cache: ChunkCache | undefined;
  readonly #log: Logger;
  readonly #parallel: number;
  readonly #retry: { initial: number; max: number };
  /** Fetches of the working set in flight: the background waits for them (takeStorePieces' `background`). */
  #setInFlight = 0;
  /** Pieces fetched ahead in flight, and the fetches they go in. */
  #ahead = 0;
  #aheadFetches = 0;
  /** Groups taken ahead (asked for in the engine) that wait for room: a working-set run that split into several fetches. */
  readonly #queued: StorePiece[][] = [];
  /** The pieces taken ahead last time mostly went in fetches of several. */
  #grouping = true;
  /** The working set may have runs not taken yet (false once a take ahead found none: the engine hands the set out first). */
  #setLeft = true;
  /** A run of a working set was taken: the session has one. */
  #setTaken = false;
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
  /** Groups handed to the engine (fetchAheadInEngine), by id: each settles true when installed, false when handed back. */
  readonly #inEngine = new Map<number, (installed: boolean) => void>();
  #nextGroupId = 0;
  #aheadInEngine = false;
  /**
   * The engine fetched a fault's chunk itself (id 0): faults are being
   * served (the fetches ahead are held, as for the feeder's own); or a group
   * handed to it (its id) is done.
   */
  readonly #onFetchedInEngine = (f: { id: number; gaveBack: boolean }) => {
    if (f.id === 0) {
      this.#lastUrgentAt = performance.now();
      this.#aheadLimit = this.#heldTo();
      return;
    }
    const settle = this.#inEngine.get(f.id);
    this.#inEngine.delete(f.id);
    settle?.(!f.gaveBack);
  };

  constructor(engine: FaultEngine, store: SnapshotStore, manifest: Manifest, cache: ChunkCache | undefined, options: StoreFeederOptions = {}) {
    super();
    this.#engine = engine;
    this.#store = store;
    this.#manifest = manifest;
    this.#places = placesOf(manifest);
    this.#cache = cache;
    this.#log = options.logger ?? silentLogger;
    this.#parallel = options.parallel ?? 16;
    this.#retry = options.retryDelayMs ?? { initial: 100, max: 5000 };
    this.#rate = options.rateBytesPerSecond ?? 0;
  }

  start(): void {
    this.#lastUrgentAt = this.#openedAt = performance.now();
    this.#engine.on('store-wanted', this.#onWanted);
    this.#engine.on('store-fetched', this.#onFetchedInEngine);
    this.#pump();
  }

  /** From now on the groups taken ahead are handed to the engine, which fetches them itself where it can (one ranged GET each). */
  fetchAheadInEngine(): void {
    this.#aheadInEngine = true;
  }

  /** Tops the working set and the background up again (e.g. once it was started). */
  pump(): void {
    this.#pump();
  }

  stop(): void {
    this.#stopped = true;
    this.#engine.off('store-wanted', this.#onWanted);
    this.#engine.off('store-fetched', this.#onFetchedInEngine);
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    if (this.#soon) clearImmediate(this.#soon);
    this.#soon = null;
    if (this.#afterDemand) clearTimeout(this.#afterDemand);
    this.#afterDemand = null;
    for (const settle of this.#inEngine.values()) settle(false);
    this.#inEngine.clear();
  }

  get outage(): boolean {
    return this.#outageSince !== 0;
  }

  #pump(): void {
    if (this.#stopped) return;
    const limit = this.#aheadRoom();
    const held = limit <= AHEAD_DURING_DEMAND && limit < this.#parallel;
    if (held && !this.#setLeft && this.#aheadFetches >= limit) this.stats.aheadHeldForFaults++;
    // What is taken ahead: nothing during an outage (the pieces in flight are retried), nor while groups taken before wait
    // for room; while faults are served, a run at a time until the fetches they make fill the room; else `room` pieces.
    const urgent: StorePiece[][] = [];
    const taken: StorePiece[][] = [];
    let takenPieces = 0;
    let takenOfSet = false;
    let fromCache = 0;
    const take = (ahead: number, cacheBytes: number) => {
      // The background waits while the working set is in flight (or waiting for room): the set is what the workload touches next.
      const setPending = this.#setInFlight > 0 || takenOfSet || this.#queued.some((g) => g[0].why === Reason.prefetch);
      const answer = this.#engine.takeStorePieces(ahead, cacheBytes, !setPending);
      fromCache += answer.fromCache;
      const ofSet = answer.pieces.some((piece) => piece.why === Reason.prefetch);
      if (ofSet) this.#setTaken = true;
      else if (ahead > 0) this.#setLeft = false;
      for (const piece of answer.pieces) {
        if (!isAhead(piece)) {
          urgent.push([piece]);
          continue;
        }
        // The working set's runs go whole; the background's, whole while no fault is served.
        const most = piece.why === Reason.prefetch || !held ? PIECES_PER_FETCH : 1;
        const last = taken.at(-1);
        if (last && last.length < most && this.#follows(last.at(-1)!, piece)) last.push(piece);
        else taken.push([piece]);
        takenPieces++;
        takenOfSet ||= piece.why === Reason.prefetch;
      }
      return answer.pieces.length;
    };
    // While faults are served, the working set still goes `parallel` pieces at a time, as in a quiet moment: it is what
    // they wait for next (holding it back makes them wait longer). The background is held to `limit` fetches.
    const heldFull = () => (this.#setLeft ? this.#ahead + takenPieces >= this.#parallel : this.#aheadFetches + taken.length >= limit);
    if (this.#outageSince || this.#queued.length > 0 || (held && heldFull()))
      take(0, 0); // the pieces faults wait on, always
    else if (held) {
      // A working-set run is joined with the set's neighbours by the engine (up to PIECES_PER_FETCH pieces): one fetch
      // where its chunks lie one after another in a pack, several where they do not (the older layout, a child's
      // chunks in its parent's packs). A background piece is one. What the host's cache holds goes in here, up to
      // INSTALL_HERE_BYTES a turn (a take that found some is counted as having used its share); the rest is fetched.
      let cacheShares = AHEAD_DURING_DEMAND;
      while (!heldFull()) {
        const before = fromCache;
        if (take(1, cacheShares > 0 ? INSTALL_HERE_BYTES / AHEAD_DURING_DEMAND : 0) === 0) break;
        if (fromCache > before) cacheShares--;
      }
    } else {
      let room = Math.max(0, limit - this.#ahead);
      // While the pieces taken go in whole fetches, whole fetches only: the room one leaves is filled by one of the same size
      // (not by many single pieces). Where they do not group (chunks of the older layout, a child's in its parent's packs), any room.
      if (this.#ahead > 0 && this.#grouping && limit >= 2 * PIECES_PER_FETCH) room -= room % PIECES_PER_FETCH;
      take(room, INSTALL_HERE_BYTES);
    }
    // Zero chunks and pieces the host's cache held went in at once: the next ones are taken on the next turn of the loop.
    if (fromCache > 0) this.#pumpSoon();
    if (taken.length > 0 && !held) this.#grouping = taken.filter((g) => g.length > 1).length * 2 >= taken.length;
    for (const group of urgent) this.#start(group, false);
    // Ahead: those that waited first, then these, while there is room (fetches while held, pieces otherwise).
    this.#queued.push(...taken);
    const room = (group: StorePiece[]) =>
      !held ? this.#ahead < limit : group[0].why === Reason.prefetch ? this.#ahead < this.#parallel : this.#aheadFetches < limit;
    while (this.#queued.length > 0 && room(this.#queued[0])) this.#start(this.#queued.shift()!, true);
    if (limit < this.#parallel) this.#pumpAfterDemand();
  }

  /** Fetches a group (one fetch) and installs it; pumps again when it is done. */
  #start(group: StorePiece[], ahead: boolean): void {
    const ofSet = group[0].why === Reason.prefetch;
    if (ofSet) this.stats.mostSetInFlight = Math.max(this.stats.mostSetInFlight, ++this.#setInFlight);
    if (ahead) {
      this.#ahead += group.length;
      this.#aheadFetches++;
    } else {
      this.#urgent++;
      this.#lastUrgentAt = performance.now();
    }
    void this.#paced(group, ahead)
      .then(() => this.#feed(group, 0))
      .finally(() => {
        if (ofSet) this.#setInFlight--;
        if (ahead) {
          this.#ahead -= group.length;
          this.#aheadFetches--;
        } else {
          this.#urgent--;
          this.#lastUrgentAt = performance.now();
        }
        this.#pump();
      });
  }

  /** `next` is fetched ahead too, right after `prev` in its region, and its first chunk lies right after prev's last in one pack. */
  #follows(prev: StorePiece, next: StorePiece): boolean {
    if (next.why !== prev.why || next.sourceRegion !== prev.sourceRegion || next.sourceFirst !== prev.sourceFirst + prev.sourceCount) return false;
    const region = this.#manifest.regions[prev.sourceRegion];
    const a = this.#places.get(region.chunks[Math.floor(((prev.sourceFirst + prev.sourceCount) * region.pageSize - 1) / region.chunkBytes)]);
    const b = this.#places.get(region.chunks[Math.floor((next.sourceFirst * region.pageSize) / region.chunkBytes)]);
    return !!a && !!b && liesAfter(a, b);
  }

  /** A fault's piece is in flight, or one came within DEMAND_ACTIVE_MS (a session starts so). */
  #servingFaults(now = performance.now()): boolean {
    return this.#urgent > 0 || now - this.#lastUrgentAt < DEMAND_ACTIVE_MS;
  }

  /** What may be fetched ahead at once now: AHEAD_DURING_DEMAND while faults are served, doubling each quiet DEMAND_ACTIVE_MS. */
  #aheadRoom(): number {
    const now = performance.now();
    if (this.#servingFaults(now)) {
      this.#aheadLimit = this.#heldTo();
      this.#openedAt = now;
    } else if (now - this.#openedAt >= DEMAND_ACTIVE_MS) {
      this.#aheadLimit = Math.min(this.#parallel, this.#aheadLimit * 2);
      this.#openedAt = now;
    }
    return Math.min(this.#parallel, this.#aheadLimit);
  }

  /** What is fetched ahead while faults are served: AHEAD_DURING_DEMAND, or AHEAD_AFTER_SET once a working set is all taken. */
  #heldTo(): number {
    return this.#setTaken && !this.#setLeft ? AHEAD_AFTER_SET : AHEAD_DURING_DEMAND;
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

  /** Pieces fetched ahead wait their turn under the rate limit. */
  async #paced(group: StorePiece[], ahead: boolean): Promise<void> {
    if (!ahead || this.#rate <= 0) return;
    const now = Date.now();
    const at = Math.max(now, this.#nextAheadAt);
    const bytes = group.reduce((n, piece) => n + piece.sourceCount * this.#manifest.regions[piece.sourceRegion].pageSize, 0);
    this.#nextAheadAt = at + (bytes / this.#rate) * 1000;
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

  /** Fetches pieces (one fetch) and installs them; while the store is out of reach, again after the backoff. */
  async #feed(group: StorePiece[], attempt: number): Promise<void> {
    const piece = group[0];
    // Handed to the engine where it can fetch it (its threads count what they install); handed back, fetched here.
    if (this.#aheadInEngine && isAhead(piece)) {
      const id = (this.#nextGroupId = (this.#nextGroupId % 0xfffffffe) + 1);
      const installed = new Promise<boolean>((resolve) => this.#inEngine.set(id, resolve));
      if (this.#engine.fetchAheadInEngine(group, id)) {
        if (await installed) {
          this.#recovered();
          return;
        }
      } else this.#inEngine.delete(id);
    }
    for (;;) {
      if (this.#stopped) return;
      try {
        const data = await this.#fetch(group);
        if (this.#stopped) return;
        group.forEach((p, i) => this.#engine.installPiece(p, data[i]));
        this.stats.pieces += group.length;
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

  /** Each piece's source pages (null: all zeros), from their chunks: neighbours in a pack with one GET. */
  async #fetch(group: StorePiece[]): Promise<(Buffer | null)[]> {
    const spans = group.map((piece) => {
      const region = this.#manifest.regions[piece.sourceRegion];
      const start = piece.sourceFirst * region.pageSize;
      const end = start + piece.sourceCount * region.pageSize;
      const first = Math.floor(start / region.chunkBytes);
      const last = Math.floor((end - 1) / region.chunkBytes);
      return { region, start, end, first, hashes: region.chunks.slice(first, last + 1) };
    });
    const wanted = spans.flatMap((s) => s.hashes.filter((h) => h).map((hash) => ({ hash, place: this.#places.get(hash) })));
    const fetched = await this.#store.chunks(wanted, this.#cache);
    let k = 0;
    return spans.map(({ region, start, end, first, hashes }) => {
      const contents = hashes.map((hash, i) => {
        if (!hash) {
          this.stats.zeroChunks++;
          return null;
        }
        const content = fetched[k++];
        const at = (first + i) * region.chunkBytes;
        const want = Math.min(region.chunkBytes, region.length - at);
        if (content.length !== want) {
          throw Object.assign(new Error(`chunk ${hash.slice(0, 16)} holds ${content.length} bytes where the manifest needs ${want}`), {
            code: ErrorCode.STORE_CORRUPT,
          });
        }
        this.stats.chunks++;
        return content;
      });
      if (contents.every((c) => c === null)) return null;
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
    });
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
