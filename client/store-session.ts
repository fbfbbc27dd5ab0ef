// A destination session whose pages come from an image in a snapshot store
// (`--image s3://BUCKET/PREFIX/NAME`): no source process. The engine wants
// pieces (addon/store_supply.h) and the feeder (client/store-feeder.ts)
// fetches their chunks through the host's chunk cache. A store out of reach
// pauses the session until it answers again, or until the give-up time; the
// digest at the end is the manifest's.
import { EventEmitter } from 'node:events';
import { ErrorCode, PostcopyError, type CodedError } from '../lib/errors.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import type { MessageOf, RegionInfo, VerifyRequest } from '../lib/protocol.js';
import { StateMachine, type TransitionTable } from '../lib/state-machine.js';
import { transferOptions, type TransferOptions } from '../lib/transfer.js';
import { formatStoreUrl, parseImageUrl } from '../lib/store/address.js';
import { ChunkCache, type ChunkCacheOptions } from '../lib/store/chunk-cache.js';
import { packKey, placesOf, totalBytes, type Manifest } from '../lib/store/manifest.js';
import type { StoreGetsConfig, StoreInEngineStats } from '../lib/native.js';
import type { StoreCredentials } from '../lib/store/object-store.js';
import { SnapshotStore } from '../lib/store/snapshot-store.js';
import type { TenantKey } from '../lib/store/tenant.js';
import type { DestinationStats, FaultEngine } from './fault-engine.js';
import { StoreFeeder, type StoreFeederStats } from './store-feeder.js';
import { checkReplay } from './working-set.js';
import { sessionClosed, whenState, type EngineFactory, type PageSession, type RecoveryStatus, type ReplayOptions } from './session.js';

/** running: pieces come as wanted; paused: the store is out of reach; resident: every page is in; verified: checked against the manifest. */
export type StoreState = 'running' | 'paused' | 'resident' | 'verified' | 'failed' | 'closed';

const TRANSITIONS: TransitionTable<StoreState> = {
  running: ['paused', 'resident', 'failed', 'closed'],
  paused: ['running', 'resident', 'failed', 'closed'],
  resident: ['verified', 'failed', 'closed'],
  verified: ['closed'],
  failed: ['closed'],
  closed: [],
};

/**
 * The engine's own connections to the store for faults' chunks: a fault
 * waits on its own chunk (and its window's), so a few carry every fault at
 * once while the rest of what the store is asked goes through the feeder.
 */
const IN_ENGINE_CONNECTIONS = 4;

/** Every state of a StoreSession, in the table's order. */
export const STORE_STATES = Object.keys(TRANSITIONS) as readonly StoreState[];

/**
 * A store image's transfer options: with no window asked for, none: a fault
 * brings its whole chunk (16 pages at the default 64 KiB), and a window of a
 * few pages past the chunk's edge would cost a GET of another chunk for them
 * (\`postcopy bench store\`'s cold case: a random tenth of 16,384 pages, fault
 * p50 3.1-3.8 ms without against 3.9-4.7 ms with the 8:2 window, 847 chunks
 * fetched against 917, the workload's time the same). A window asked for is
 * kept.
 */
export function storeTransferOptions(options: Pick<StoreSessionOptions, 'window' | 'background'>): TransferOptions {
  return transferOptions({ ...options, window: options.window ?? { forward: 0, backward: 0 } });
}

export interface StoreSessionOptions extends ReplayOptions {
  /** The image: s3://BUCKET[/PREFIX]/NAME, or a store already open (the caller closes it) and a name (and its manifest, when already read). */
  storeImage: string | { store: SnapshotStore; name: string; manifest?: Manifest };
  /** How to reach the store (default: the AWS way, lib/store/object-store.ts). */
  credentials?: StoreCredentials;
  /** The tenant's key the image was pushed with (lib/store/tenant.ts). */
  tenant?: TenantKey;
  /** The host's chunk cache (default: the shared one, lib/store/chunk-cache.ts); false: none. */
  cache?: ChunkCache | ChunkCacheOptions | false;
  window?: Partial<TransferOptions['window']>;
  background?: Partial<TransferOptions['background']>;
  /** Pieces fetched ahead (working set, background) at a time (default: about 8 MiB of chunks, 16 to 128). */
  parallel?: number;
  /**
   * Faults' chunks fetched by the engine's own threads, with no trip through
   * JavaScript (default true; where the store is plain HTTP, the image not
   * sealed with a tenant's key, and the keys do not expire). False: every
   * chunk goes through the feeder.
   */
  fetchInEngine?: boolean;
  recovery?: {
    /** Backoff between attempts at a piece (default 100 ms doubling to 5 s). */
    retryDelayMs?: { initial: number; max: number };
    /** Fail once the store has been out of reach this long (default: never). */
    giveUpAfterMs?: number;
  };
  logger?: Logger;
}

/** Events: 'paused' (CodedError), 'resumed' ({outageMs}), 'failed' (CodedError), 'state' (to, from). */
export class StoreSession extends EventEmitter implements PageSession {
  readonly engine: FaultEngine;
  readonly transfer: TransferOptions;
  readonly regions: RegionInfo[];
  readonly fingerprint: string;
  readonly manifest: Manifest;
  readonly cache: ChunkCache | undefined;
  readonly #store: SnapshotStore;
  readonly #ownStore: boolean;
  readonly #feeder: StoreFeeder;
  readonly #machine: StateMachine<StoreState>;
  readonly #giveUpAfterMs: number;
  #giveUpTimer: NodeJS.Timeout | null = null;
  #resumes = 0;
  #pausedMs = 0;
  #pausedSince = 0;
  #lastError: CodedError | null = null;

  private constructor(
    o: { store: SnapshotStore; ownStore: boolean; manifest: Manifest; cache: ChunkCache | undefined; engine: FaultEngine; regions: RegionInfo[] },
    options: StoreSessionOptions,
    transfer: TransferOptions,
    machine: StateMachine<StoreState>,
    log: Logger,
  ) {
    super();
    this.#store = o.store;
    this.#ownStore = o.ownStore;
    this.manifest = o.manifest;
    this.cache = o.cache;
    this.engine = o.engine;
    this.regions = o.regions;
    this.fingerprint = o.manifest.fingerprint;
    this.transfer = transfer;
    this.#machine = machine;
    this.#giveUpAfterMs = options.recovery?.giveUpAfterMs ?? Infinity;
    machine.onChange((to, from) => this.emit('state', to, from));
    // Enough requests in flight to fill the link: about 8 MiB of chunks, 16 to 128 requests.
    const largest = Math.max(...o.manifest.regions.map((r) => r.chunkBytes));
    const parallel = options.parallel ?? Math.min(128, Math.max(16, Math.round((8 << 20) / largest)));
    this.#feeder = new StoreFeeder(o.engine, o.store, o.manifest, o.cache, {
      logger: log,
      parallel,
      rateBytesPerSecond: transfer.background.rateBytesPerSecond,
      ...(options.recovery?.retryDelayMs ? { retryDelayMs: options.recovery.retryDelayMs } : {}),
    });
    this.#feeder.on('outage', (e: CodedError) => this.#pause(e));
    this.#feeder.on('recovered', () => this.#resume());
    this.#feeder.on('failed', (e: CodedError) => this.fail(e));
    o.engine.on('complete', () => {
      if (this.#machine.is('paused')) this.#resume();
      if (this.#machine.is('running')) this.#machine.to('resident', { fullResidencyMs: Math.round(o.engine.stats().fullResidencyNs / 1e4) / 100 });
      this.#feeder.stop();
    });
    o.engine.on('store-fetched', (f: { keptBytes: number }) => {
      if (f.keptBytes > 0) this.cache?.keptElsewhere(f.keptBytes);
    });
    o.engine.on('channel-failed', (f: { targetGone: boolean; error: CodedError }) => {
      if (!f.targetGone) this.fail(f.error);
    });
  }

  /** Reads the image's manifest, has `buildEngine` make the engine over its regions, and starts fetching. */
  static async open(options: StoreSessionOptions, buildEngine: EngineFactory): Promise<StoreSession> {
    const log = options.logger ?? silentLogger;
    const transfer = storeTransferOptions(options);
    const named = typeof options.storeImage === 'string' ? parseImageUrl(options.storeImage) : null;
    const store = named
      ? new SnapshotStore(named, { ...options.credentials, logger: log, ...(options.tenant ? { tenant: options.tenant } : {}) })
      : (options.storeImage as { store: SnapshotStore; name: string }).store;
    const name = named ? named.name : (options.storeImage as { name: string }).name;
    let engine: FaultEngine | undefined;
    try {
      const given = typeof options.storeImage === 'string' ? undefined : options.storeImage.manifest;
      const manifest = given?.name === name ? given : await store.manifest(name);
      const regions: RegionInfo[] = manifest.regions.map(({ id, name: n, length, pageSize, contentLength }) => ({
        id,
        name: n,
        length,
        pageSize,
        contentLength,
      }));
      if (options.prefetch) checkReplay(options.prefetch, regions, manifest.fingerprint, log);
      // How the engine reaches the store itself, found before it starts: its first faults go straight to its own threads.
      const gets = options.fetchInEngine !== false && !options.tenant ? await inEngineGets(store, manifest, log) : null;
      const cache =
        options.cache === false ? undefined : options.cache instanceof ChunkCache ? options.cache : new ChunkCache({ ...options.cache, logger: log });
      const machine = new StateMachine<StoreState>('destination', 'running', TRANSITIONS, log);
      engine = buildEngine(regions, {
        store: {
          chunkBytes: manifest.regions.map((r) => r.chunkBytes),
          chunks: manifest.regions.map((r) => chunkNames(r.chunks)),
          ...(cache ? { cacheDir: cache.dir } : {}),
        },
        window: transfer.window,
        background: transfer.background.enabled && !options.holdBackground,
        ...(options.prefetch ? { prefetch: options.prefetch.entries } : {}),
      });
      const session = new StoreSession({ store, ownStore: named !== null, manifest, cache, engine, regions }, options, transfer, machine, log);
      log.info(
        {
          image: formatStoreUrl(store.address, name),
          endpoint: store.objects.endpoint,
          regions: regions.length,
          bytes: totalBytes(manifest),
          cache: cache?.dir,
          ...transfer,
        },
        'restoring from a store',
      );
      if (gets && !engine.complete) {
        engine.fetchStoreInEngine(gets);
        session.#feeder.fetchAheadInEngine();
        log.debug({ address: gets.address, port: gets.port, connections: gets.connections }, "faults' chunks are fetched in the engine");
      }
      session.#feeder.start();
      if (engine.complete) machine.to('resident');
      return session;
    } catch (err) {
      engine?.stop();
      if (named) store.close();
      throw err;
    }
  }

  get state(): StoreState {
    return this.#machine.state;
  }

  /** Once the engine's own fetches are all kept in the host's cache (bounded: a fetch's timeout and a margin). */
  async #inEngineSettled(): Promise<void> {
    const deadline = Date.now() + 15_000;
    while (this.engine.storeInEngine.fetching > 0 && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.engine.off('store-fetched', done);
          resolve();
        };
        const timer = setTimeout(done, 50);
        this.engine.on('store-fetched', done);
      });
    }
  }

  /** What the feeder fetched, and what the store was asked. */
  get fetched(): StoreFeederStats & {
    store: SnapshotStore['objects']['stats'];
    cache?: ChunkCache['stats'];
    piecesFromCache: number;
    inEngine: Omit<StoreInEngineStats, 'fetching'>;
  } {
    const { fetching: _, ...inEngine } = this.engine.storeInEngine;
    const objects = this.#store.objects.stats;
    const feeder = this.#feeder.stats;
    return {
      ...feeder,
      // What the engine's own threads fetched (a piece of one chunk each) counts with the feeder's, and with the store's figures.
      pieces: feeder.pieces + inEngine.pieces,
      chunks: feeder.chunks + inEngine.pieces,
      // Pieces the fault thread read from the host's cache itself (the cache's own hits are what the feeder asked it).
      piecesFromCache: this.engine.storePiecesFromCache,
      inEngine,
      store: { ...objects, gets: objects.gets + inEngine.gets, bytesFetched: objects.bytesFetched + inEngine.bytesFetched },
      // The engine's fetches are the cache's misses; a chunk another process kept while the engine waited for its lock, joined.
      ...(this.cache ? { cache: this.#cacheStats(inEngine) } : {}),
    };
  }

  #cacheStats(inEngine: Omit<StoreInEngineStats, 'fetching'>): ChunkCache['stats'] {
    const s = this.cache!.stats;
    return { ...s, misses: s.misses + inEngine.pieces, joined: s.joined + inEngine.fromCache, damaged: s.damaged + inEngine.damaged };
  }

  status(): RecoveryStatus {
    return {
      state: this.state,
      session: 'store',
      source: formatStoreUrl(this.#store.address, this.manifest.name),
      resumes: this.#resumes,
      pausedMs: this.#pausedMs + (this.#pausedSince ? Date.now() - this.#pausedSince : 0),
      ...(this.#lastError ? { lastError: { code: this.#lastError.code, message: this.#lastError.message } } : {}),
    };
  }

  stats(): DestinationStats {
    return this.engine.stats();
  }

  finalStats(): DestinationStats {
    return this.engine.stats();
  }

  startBackground(): void {
    this.engine.startBackground();
    this.#feeder.pump();
  }

  whenRunning(): Promise<void> {
    return Promise.resolve();
  }

  whenResident(): Promise<void> {
    return whenState(this, ['resident', 'verified'], () => (this.#lastError && this.#machine.is('failed') ? this.#lastError : sessionClosed(this.#lastError)));
  }

  /** The manifest's digests, as a source would answer `done` (installed-pages checksums need the image itself: not asked of a store). */
  async exchangeDigest(_stats: Record<string, unknown>, _verify?: VerifyRequest): Promise<MessageOf<'digest'>> {
    await this.whenResident();
    await this.#inEngineSettled();
    await this.cache?.settled(); // a finished restore leaves every chunk it fetched kept for the next one on this host
    // The report's `source`: what came from the store, and what the cache answered.
    return { t: 'digest', regions: this.manifest.regions.map((r) => ({ id: r.id, sha256: r.sha256 })), stats: { pagesSent: 0, ...this.fetched } };
  }

  verified(details: Record<string, unknown> = {}): void {
    if (this.#machine.can('verified')) this.#machine.to('verified', { ...details, fetched: this.fetched });
  }

  /** Every page is here: nothing more is asked of the store. */
  release(): void {
    this.#feeder.stop();
  }

  fail(err: CodedError): void {
    if (!this.#machine.can('failed')) return;
    this.#stopWaiting();
    this.#feeder.stop();
    this.#lastError = err;
    this.#machine.to('failed', { code: err.code, error: err.message });
    this.emit('failed', err);
  }

  close(): void {
    if (this.#machine.is('closed')) return;
    this.#stopWaiting();
    this.#feeder.stop();
    this.engine.stop();
    if (this.#ownStore) this.#store.close();
    this.#machine.to('closed', this.status() as unknown as Record<string, unknown>);
  }

  #pause(err: CodedError): void {
    this.#lastError = err;
    if (!this.#machine.is('running')) return;
    this.#pausedSince = Date.now();
    const s = this.engine.stats();
    this.#machine.to('paused', { code: err.code, error: err.message, residentPages: s.residentPages, totalPages: s.totalPages });
    this.emit('paused', err);
    if (Number.isFinite(this.#giveUpAfterMs)) {
      this.#giveUpTimer = setTimeout(() => {
        this.#giveUpTimer = null;
        const last = this.#lastError;
        this.fail(
          new PostcopyError(
            ErrorCode.SOURCE_LOST,
            `the store stayed out of reach for ${this.#giveUpAfterMs} ms${last ? ` (last: ${last.code}: ${last.message})` : ''}`,
            last ? { cause: last.code } : undefined,
          ),
        );
      }, this.#giveUpAfterMs);
      this.#giveUpTimer.unref();
    }
  }

  #resume(): void {
    if (!this.#machine.is('paused')) return;
    const outageMs = Date.now() - this.#pausedSince;
    this.#stopWaiting();
    this.#resumes++;
    this.#machine.to('running', { outageMs });
    this.emit('resumed', { outageMs });
  }

  #stopWaiting(): void {
    if (this.#giveUpTimer) clearTimeout(this.#giveUpTimer);
    this.#giveUpTimer = null;
    if (this.#pausedSince) this.#pausedMs += Date.now() - this.#pausedSince;
    this.#pausedSince = 0;
  }
}

/** The manifest of the image `options` names (the store answers, and holds it). */
export async function readStoreManifest(options: Pick<StoreSessionOptions, 'storeImage' | 'credentials' | 'tenant' | 'logger'>): Promise<Manifest> {
  if (typeof options.storeImage !== 'string') return options.storeImage.store.manifest(options.storeImage.name);
  const at = parseImageUrl(options.storeImage);
  const store = new SnapshotStore(at, {
    ...options.credentials,
    ...(options.logger ? { logger: options.logger } : {}),
    ...(options.tenant ? { tenant: options.tenant } : {}),
  });
  try {
    return await store.manifest(at.name);
  } finally {
    store.close();
  }
}

/**
 * What the engine needs to fetch the image's chunks itself (the store's
 * address and keys, each chunk's place in its pack), or null where it cannot
 * (lib/store/object-store.ts, inEngineGets; an image of the layout before packs).
 */
async function inEngineGets(store: SnapshotStore, manifest: Manifest, log: Logger): Promise<StoreGetsConfig | null> {
  const placeOf = placesOf(manifest);
  const packs = new Map<string, number>();
  const places = manifest.regions.map((r) => {
    const out = Buffer.alloc(r.chunks.length * 24);
    r.chunks.forEach((hash, i) => {
      const place = hash ? placeOf.get(hash) : undefined;
      if (!place) return out.writeBigInt64LE(-1n, i * 24);
      let pack = packs.get(place.pack);
      if (pack === undefined) packs.set(place.pack, (pack = packs.size));
      out.writeBigInt64LE(BigInt(pack), i * 24);
      out.writeBigUInt64LE(BigInt(place.offset), i * 24 + 8);
      out.writeBigUInt64LE(BigInt(place.length), i * 24 + 16);
    });
    return out;
  });
  if (packs.size === 0) return null; // chunks stored as their own objects (images pushed before packs): the feeder fetches them
  const gets = await store.objects.inEngineGets([...packs.keys()].map(packKey)).catch(() => null);
  if (!gets) {
    log.debug({ endpoint: store.objects.endpoint }, 'faults are fetched by the feeder (an https endpoint, or keys that expire)');
    return null;
  }
  return { ...gets, places, connections: IN_ENGINE_CONNECTIONS };
}

/** A region's chunk names as the engine takes them: 32 bytes each, zeros for a zero chunk. */
function chunkNames(chunks: readonly string[]): Uint8Array {
  const out = Buffer.alloc(chunks.length * 32);
  chunks.forEach((hash, i) => {
    if (hash) out.write(hash, i * 32, 32, 'hex');
  });
  return out;
}
