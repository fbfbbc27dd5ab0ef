// The destination's native fault engine, typed and validated: it serves the
// faults of one userfaultfd over a set of regions from a source's data
// channels, which can be detached (faults wait) and attached anew (the
// requests still unanswered go out again).
import { EventEmitter } from 'node:events';
import {
  native,
  type DestinationStats,
  type InstalledChecksum,
  type NativeEvent,
  type NativeFaultEngine,
  type ServedRegionSpec,
  type StorePiece,
  type StoreGetsConfig,
  type StoreInEngineStats,
} from '../lib/native.js';
import { ErrorCode, PostcopyError, errorOfEvent, type CodedError } from '../lib/errors.js';
import { closeSync } from 'node:fs';
import { hasOverlap, validateAligned, validateFd, validateInteger } from '../lib/validate.js';
import { MAX_RUN_BYTES } from '../lib/limits.js';
import { MAX_WINDOW, type TransferOptions } from '../lib/transfer.js';
import { MAX_CHUNK_BYTES } from '../lib/store/chunk.js';
import type { DataChannelKeys } from '../lib/protocol.js';
import { silentLogger, type Logger } from '../lib/logger.js';

export type { DestinationStats } from '../lib/native.js';

export interface TargetRegion {
  /** Start of the region in the address space of the process that faults (ours or a VMM's). */
  base: number;
  length: number;
  pageSize: number;
  /** The source region backing it (default: the region's own index). */
  sourceRegion?: number;
  /** The first source page backing it (default 0). */
  sourcePage?: number;
  /**
   * MINOR mode: where this process maps the same memory file (a memfd or
   * shared-memory file the memory's owner maps shared and registered for
   * MINOR faults). Contents go into the page cache through it; faults are
   * answered with UFFDIO_CONTINUE. The caller keeps it mapped until stop().
   */
  fillAddress?: number;
}

export interface SourceRegion {
  pages: number;
  pageSize: number;
}

export interface FaultEngineOptions {
  /** The userfaultfd whose faults this engine serves (none for a template's filler). */
  uffd?: number;
  regions: readonly TargetRegion[];
  /** The source's regions (default: one per target region, the same size). */
  sourceRegions?: readonly SourceRegion[];
  /** Pin the engine's threads to this CPU (default: not pinned). */
  cpu?: number;
  /**
   * Hash every page as it is installed, for installedChecksum() (default
   * false: a restore reads its memory back instead; a VMM's guest writes to
   * its memory, so its handler checks what went in).
   */
  checksumInstalled?: boolean;
  /** Keep every page a thread faulted on while it was missing, in first-touch order, for faultedPages() (default false). */
  recordFaults?: boolean;
  /**
   * Where the pages come from when not from a source's data channels: an
   * image in this process, one spec per source region (lib/image.ts), with
   * the window and background the engine then runs itself.
   */
  local?: LocalImageSupply | TemplateSupply | StoreImageSupply;
  /**
   * This engine fills a template (client/template.ts): no process faults on
   * its regions, each a whole source region mapped (shared) from the
   * template's memory file, base and fillAddress alike. Pages go into the file
   * when its clones' guests ask for them, and from the window and background.
   */
  fillsTemplate?: boolean;
  /**
   * A live source: its precopy rounds come first (pages sent again are
   * written over, pages discarded at its switchover dropped), and nothing
   * completes before its switchover marker ('switchover' event).
   */
  precopy?: boolean;
  /** The regions are this process's own memory (a restore): precopy writes over and drops pages in place. */
  ownMemory?: boolean;
  /**
   * The regions are this process's own anonymous memory and the userfaultfd
   * was opened with the MOVE feature: a run that covers a whole aligned 2 MiB
   * goes in as one transparent huge page (filled beside, then moved into
   * place), far cheaper to install and to touch than 512 small pages, and the
   * workload then runs on huge-page mappings.
   */
  installHugePages?: boolean;
  logger?: Logger;
}

/** A template's clone: its guest maps the template's file privately; pages come from the template's filler. */
export interface TemplateSupply {
  template: FaultEngine;
}

/** A local image as the engine's page supply. */
export interface LocalImageSupply {
  image: readonly ServedRegionSpec[];
  window: TransferOptions['window'];
  /** Start the background fill at once (else: at startBackground()). */
  background: boolean;
  /** A working set to install first, in order (client/working-set.ts entries). */
  prefetch?: Uint8Array;
}

/** A snapshot store's image as the engine's page supply: JS fetches the pieces it wants (client/store-feeder.ts). */
export interface StoreImageSupply {
  /**
   * Per source region: its chunks' size (a power of two, whole pages) and
   * their names (32 bytes each: the chunk's SHA-256, all zeros for a zero
   * chunk); the host's chunk cache directory, which the fault thread reads
   * itself (lib/store/chunk-cache.ts).
   */
  store: { chunkBytes: number[]; chunks: Uint8Array[]; cacheDir?: string };
  window: TransferOptions['window'];
  background: boolean;
  prefetch?: Uint8Array;
}

/** A data channel failed: what happened, and which attach it belonged to. */
export interface ChannelFailure {
  /** One of our codes, or a kernel error (ENOMEM, EPIPE, ...) with errno and syscall. */
  error: CodedError;
  generation: number;
  /** The memory's owner is gone (ESRCH): nothing can be installed any more. */
  targetGone: boolean;
}

/** What the memory's owner did to its memory (REMOVE, UNMAP, REMAP, FORK events). */
export type MemoryEvent =
  | { type: 'remove' | 'unmap'; start: number; end: number }
  | { type: 'remap'; from: number; to: number; length: number; followed: boolean }
  | { type: 'fork'; fd: number };

/**
 * Events: 'complete' (every page resident), 'switchover' ({discarded, rewritten}: a live source's workload runs here now), 'channel-failed' (ChannelFailure),
 * 'uffd-closed' (PostcopyError), 'memory-event' (MemoryEvent), 'unexpected-fault' (address).
 */
export class FaultEngine extends EventEmitter {
  readonly #native: NativeFaultEngine;
  /** Pages come from a local image (no data channels). */
  readonly local: boolean;
  /** Fills a template for its clones (no process of its own). */
  readonly fillsTemplate: boolean;
  /** The memory it fills, each region with its own page size (client/report.ts counts bytes from them). */
  readonly regions: readonly { readonly length: number; readonly pageSize: number }[];
  readonly #log: Logger;
  readonly #resident: Promise<void>;
  #settle!: { resolve: () => void; reject: (e: PostcopyError) => void };
  #complete = false;
  #stopped = false;

  constructor(options: FaultEngineOptions) {
    super();
    const fillsTemplate = options.fillsTemplate === true;
    const clone = options.local && 'template' in options.local ? options.local.template : null;
    if (!fillsTemplate) validateFd(options.uffd, 'uffd');
    if (!Array.isArray(options.regions) || options.regions.length === 0) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, 'at least one region is needed');
    const regions = options.regions.map((r, i) => {
      const pageSize = validatePageSize(r.pageSize, `regions[${i}].pageSize`);
      const base = validateAligned(r.base, `regions[${i}].base`, pageSize, pageSize);
      const length = validateAligned(r.length, `regions[${i}].length`, pageSize, pageSize);
      const sourceRegion = validateInteger(r.sourceRegion ?? i, `regions[${i}].sourceRegion`);
      const sourcePage = validateInteger(r.sourcePage ?? 0, `regions[${i}].sourcePage`);
      const fillAddress = r.fillAddress === undefined ? 0 : validateAligned(r.fillAddress, `regions[${i}].fillAddress`, pageSize, pageSize);
      return { base, length, pageSize, sourceRegion, sourcePage, fillAddress };
    });
    const sourceRegions = (options.sourceRegions ?? regions.map((r) => ({ pages: r.length / r.pageSize, pageSize: r.pageSize }))).map((s, i) => ({
      pages: validateInteger(s.pages, `sourceRegions[${i}].pages`, 1),
      pageSize: validatePageSize(s.pageSize, `sourceRegions[${i}].pageSize`),
    }));
    for (const [i, r] of regions.entries()) {
      const src = sourceRegions[r.sourceRegion];
      if (!src) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `regions[${i}] names source region ${r.sourceRegion}, which does not exist`);
      // A page here is one or more whole source pages (a 2 MiB huge page from a 4 KiB-page image).
      if (r.pageSize < src.pageSize)
        throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `regions[${i}] has page size ${r.pageSize}, smaller than its source's ${src.pageSize}`);
      if (r.sourcePage + r.length / src.pageSize > src.pages)
        throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `regions[${i}] reaches past the end of source region ${r.sourceRegion}`);
    }
    if (hasOverlap(regions.map((r) => [r.base, r.base + r.length]))) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, 'regions overlap in memory');
    const imageRange = (r: (typeof regions)[number]) =>
      [r.sourceRegion * 2 ** 40 + r.sourcePage, r.sourceRegion * 2 ** 40 + r.sourcePage + r.length / sourceRegions[r.sourceRegion].pageSize] as const;
    if (hasOverlap(regions.map(imageRange))) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, 'regions overlap in the source image');
    if (fillsTemplate) checkTemplateRegions(regions, sourceRegions);
    if (clone) {
      if (!(clone instanceof FaultEngine) || !clone.fillsTemplate)
        throw new PostcopyError(ErrorCode.INVALID_ARG_TYPE, 'local.template must be the FaultEngine filling a template');
      for (const [i, r] of regions.entries()) {
        if (r.fillAddress) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `regions[${i}]: a clone's memory is the template's file, not a file of its own`);
        if (r.pageSize !== sourceRegions[r.sourceRegion].pageSize)
          throw new PostcopyError(
            ErrorCode.UNSUPPORTED,
            `regions[${i}]: a clone maps the template's pages as they are (${sourceRegions[r.sourceRegion].pageSize} bytes)`,
          );
      }
    }
    this.regions = regions.map(({ length, pageSize }) => ({ length, pageSize }));
    this.#log = options.logger ?? silentLogger;
    this.#resident = new Promise((resolve, reject) => (this.#settle = { resolve, reject }));
    this.#resident.catch(() => {});
    this.#native = new native.FaultEngine({
      uffd: fillsTemplate ? -1 : options.uffd!,
      sourceRegions,
      regions,
      cpu: options.cpu === undefined ? -1 : validateInteger(options.cpu, 'cpu', 0, 1023),
      checksumInstalled: options.checksumInstalled === true,
      recordFaults: options.recordFaults === true,
      ...(options.local && 'image' in options.local ? localSupply(options.local, sourceRegions) : {}),
      ...(options.local && 'store' in options.local ? storeSupply(options.local, sourceRegions) : {}),
      ...(clone ? { template: clone.#native } : {}),
      fillsTemplate,
      ...(options.precopy ? { precopy: true } : {}),
      ...(options.ownMemory ? { ownMemory: true } : {}),
      ...(options.installHugePages ? { installHugePages: true } : {}),
      onEvent: (e) => this.#onEvent(e),
    });
    this.local = options.local !== undefined;
    this.fillsTemplate = fillsTemplate;
  }

  /** Starts the fault thread: faults are read (and wait) from now on. */
  start(): void {
    this.#native.start();
  }

  /**
   * Hands the engine a new pair of data channels (it owns and closes them from
   * now on, even when this throws); requests still unanswered go out again on
   * them first. Returns the channels' generation.
   */
  attachChannels(channels: { urgentFd: number; bulkFd: number; keys?: DataChannelKeys }): number {
    try {
      validateFd(channels.urgentFd, 'urgentFd');
      validateFd(channels.bulkFd, 'bulkFd');
    } catch (err) {
      for (const fd of [channels.urgentFd, channels.bulkFd]) {
        if (Number.isSafeInteger(fd) && fd >= 0) {
          try {
            closeSync(fd);
          } catch {
            /* not open */
          }
        }
      }
      throw err;
    }
    return channels.keys
      ? this.#native.attachChannels(channels.urgentFd, channels.bulkFd, channels.keys)
      : this.#native.attachChannels(channels.urgentFd, channels.bulkFd);
  }

  /** Stops the receivers and closes the data channels; faults wait for the next attach. */
  detachChannels(): void {
    this.#native.detachChannels();
  }

  /** Gives up on every missing page: a touch raises SIGBUS (UFFDIO_POISON). Returns how many pages. */
  poisonMissing(): number {
    this.#native.detachChannels();
    return this.#native.poisonMissing();
  }

  /** Pages of target region `id` already present (bit p of byte p/8) settle without being fetched. Returns how many. */
  markResident(id: number, bitmap: Uint8Array): number {
    validateInteger(id, 'id');
    if (!(bitmap instanceof Uint8Array)) throw new PostcopyError(ErrorCode.INVALID_ARG_TYPE, 'bitmap must be a Uint8Array');
    return this.#native.markResident(id, bitmap);
  }

  /** One bit per page of source region `id`: what the source need not send (resident, given back, or mapped by no region). */
  heldBitmap(id: number): Buffer {
    return this.#native.heldBitmap(validateInteger(id, 'id'));
  }

  /**
   * Per source region, the checksum of the pages installed from the source's
   * data and the pages it leaves out (only kept with `checksumInstalled`).
   */
  installedChecksum(): InstalledChecksum[] {
    return this.#native.installedChecksum();
  }

  /**
   * A local image's engine installs these pages (u64 LE entries, region << 48
   * | page: client/working-set.ts) in order, after the windows of demand
   * faults and ahead of the background.
   */
  prefetch(entries: Uint8Array): void {
    this.#native.prefetch(checkEntries(entries));
  }

  /** A local image's background fill starts now (it was held back). */
  startBackground(): void {
    this.#native.startBackground();
  }

  /**
   * A store image's engine: every piece faults wait on (and their windows),
   * then up to `ahead` pieces of the working set and the background. Of
   * those, zero chunks and the pieces the host's chunk cache holds are
   * installed here, on this thread (`fromCache` of them, up to `cacheBytes`
   * of them); the others are returned to fetch. `background` false: the
   * working set's pieces only.
   */
  takeStorePieces(ahead: number, cacheBytes = 0, background = true): { pieces: StorePiece[]; fromCache: number } {
    return this.#native.takeStorePieces(
      validateInteger(ahead, 'ahead', 0, 1 << 20),
      validateInteger(cacheBytes, 'cacheBytes', 0, 1 << 30),
      background === true,
    );
  }

  /** A store image's engine: the pieces it read from the host's chunk cache itself (on its fault thread, or in takeStorePieces). */
  get storePiecesFromCache(): number {
    return this.#native.storePiecesFromCache();
  }

  /** A store image's engine: installs a piece taken with takeStorePieces (its source pages' bytes; null: zeros). False once stopped. */
  installPiece(piece: StorePiece, data: Uint8Array | null): boolean {
    if (data !== null && !(data instanceof Uint8Array)) throw new PostcopyError(ErrorCode.INVALID_ARG_TYPE, 'data must be a Uint8Array or null');
    return this.#native.installPiece(piece.region, piece.piece, piece.why, data);
  }

  /**
   * A started store image's engine: from now on its own threads fetch the
   * pieces faults wait on (addon/store_supply.h), each checked, installed and
   * kept in the host's cache; a piece they cannot fetch comes back as
   * 'store-wanted', and 'store-fetched' follows each.
   */
  fetchStoreInEngine(config: StoreGetsConfig): void {
    validateInteger(config.port, 'port', 1, 65535);
    validateInteger(config.timeoutMs, 'timeoutMs', 1, 600_000);
    validateInteger(config.connections, 'connections', 1, 64);
    for (const [name, value] of Object.entries({ host: config.host, region: config.region, keyId: config.keyId, secret: config.secret, token: config.token }))
      if (typeof value !== 'string' || /[\r\n]/.test(value)) throw new PostcopyError(ErrorCode.INVALID_ARG_VALUE, `${name} must be a string of one line`);
    if (config.places.some((p) => !(p instanceof Uint8Array) || p.length % 24 !== 0))
      throw new PostcopyError(ErrorCode.INVALID_ARG_TYPE, 'places: a Uint8Array of 24 bytes a chunk per source region');
    this.#native.fetchStoreInEngine(config);
  }

  /**
   * A store image's engine that fetches itself (fetchStoreInEngine): a group
   * of pieces taken ahead, fetched by its threads with one ranged GET; a
   * 'store-fetched' event with `id` follows. False: nothing started (the
   * group is not chunks lying one after another in one pack): fetch it here.
   */
  fetchAheadInEngine(group: StorePiece[], id: number): boolean {
    validateInteger(id, 'id', 1, 0xffffffff);
    return this.#native.fetchAheadInEngine(group, id);
  }

  /** A store image's engine: what its own fetches did (fetchStoreInEngine). */
  get storeInEngine(): StoreInEngineStats {
    return this.#native.storeInEngine();
  }

  /** With recordFaults: every page faulted on while missing, in first-touch order (u64 LE entries, region << 48 | page). */
  faultedPages(): Buffer {
    return this.#native.faultedPages();
  }

  /** For each bound (ns, ascending), how many faults waited at most that long: a Prometheus histogram's buckets. */
  latencyBuckets(boundsNs: readonly number[]): number[] {
    if (!Array.isArray(boundsNs) || !boundsNs.every((b, i) => typeof b === 'number' && b >= 0 && (i === 0 || b >= boundsNs[i - 1]))) {
      throw new PostcopyError(ErrorCode.OUT_OF_RANGE, 'boundsNs must be ascending non-negative numbers');
    }
    return this.#native.latencyBuckets([...boundsNs]);
  }

  /** Resolves once every page of every region is resident; rejects if the engine fails first. */
  whenResident(): Promise<void> {
    return this.#resident;
  }

  get complete(): boolean {
    return this.#complete;
  }

  /** stop() was called. */
  get stopped(): boolean {
    return this.#stopped;
  }

  stats(): DestinationStats {
    return this.#native.stats();
  }

  /** One bit per page (bit p of byte p/8): what is resident in region `id`. */
  receivedBitmap(id: number): Buffer {
    return this.#native.receivedBitmap(validateInteger(id, 'id'));
  }

  /** Joins the native threads and closes the data channels; the userfaultfd stays open. Rejects whenResident() if pages are missing. */
  stop(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#native.stop();
    if (!this.#complete) this.#settle.reject(new PostcopyError(ErrorCode.PEER_GONE, 'the engine was stopped before every page was resident'));
  }

  #onEvent(e: NativeEvent): void {
    try {
      switch (e.type) {
        case 'complete':
          this.#complete = true;
          this.#log.info({ fullResidencyMs: Math.round(e.elapsedNs / 1e4) / 100 }, 'every page is resident');
          this.#settle.resolve();
          this.emit('complete');
          return;
        case 'switchover':
          this.emit('switchover', { discarded: e.discarded, rewritten: e.rewritten });
          return;
        case 'discards-dropped':
          this.emit('discards-dropped', e.round);
          return;
        case 'store-wanted':
          this.emit('store-wanted');
          return;
        case 'store-fetched':
          if (e.gaveBack) this.#log.debug({ why: e.message }, 'a piece the engine could not fetch goes to the feeder');
          else if (e.message) this.#log.warn({ err: e.message }, 'a chunk the engine fetched was not kept');
          this.emit('store-fetched', { id: e.id, keptBytes: e.keptBytes, gaveBack: e.gaveBack === 1 });
          return;
        case 'background-done':
          this.#log.debug('the source has sent every page');
          return;
        case 'remove':
        case 'unmap':
          this.emit('memory-event', { type: e.type, start: e.start, end: e.end } satisfies MemoryEvent);
          return;
        case 'remap':
          // A region moved whole or in part is served at its new place (in pieces); memory holding no region is no concern of ours.
          this.#log.info({ from: e.from, to: e.to, length: e.length, followed: e.followed === 1 }, 'memory moved (mremap)');
          this.emit('memory-event', { type: 'remap', from: e.from, to: e.to, length: e.length, followed: e.followed === 1 } satisfies MemoryEvent);
          return;
        case 'fork':
          this.emit('memory-event', { type: 'fork', fd: e.fd } satisfies MemoryEvent);
          return;
        case 'unknown-event':
          this.#log.warn({ event: e.event }, 'an unknown userfaultfd event');
          return;
        case 'unexpected-fault':
          // Memory the process added to a registered mapping (mremap grew it): it holds no image page.
          this.#log.debug({ address: e.address }, 'a fault outside every region: zero-filled, as fresh memory reads');
          this.emit('unexpected-fault', e.address);
          return;
        case 'uffd-closed': {
          if (this.#stopped) return;
          const err = new PostcopyError(ErrorCode.UFFD_CLOSED, e.message ?? 'the userfaultfd was closed', { native: e.code });
          this.#log.warn({ code: err.code, native: e.code }, "the userfaultfd was hung up: the memory's owner is gone");
          this.emit('uffd-closed', err);
          return;
        }
      }
      if (this.#stopped) return;
      const what = `${e.channel ? `${e.channel} channel: ` : ''}${e.message ?? e.type}`;
      const error = errorOfEvent(e, what, ErrorCode.PEER_GONE, { event: e.type });
      this.#log.debug(
        { code: error.code, errno: error.errno, syscall: error.syscall, channel: e.channel, generation: e.generation, err: error.message },
        'data channel failed',
      );
      this.emit('channel-failed', { error, generation: e.generation, targetGone: e.type === 'target-gone' } satisfies ChannelFailure);
    } catch (err) {
      this.#log.error({ err }, 'handling a fault-engine event failed');
    }
  }
}

/** A page size the data channels can carry: a power of two from 4 KiB to one run (2 MiB). */
function validatePageSize(value: unknown, name: string): number {
  const size = validateInteger(value, name, 4096, MAX_RUN_BYTES);
  if ((size & (size - 1)) !== 0) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `${name} must be a power of two`);
  return size;
}

/** A template's filler covers each source region whole, in its own mapping of the template's file. */
function checkTemplateRegions(
  regions: readonly { base: number; length: number; sourceRegion: number; sourcePage: number; fillAddress: number }[],
  sources: readonly SourceRegion[],
): void {
  if (regions.length !== sources.length) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, "a template's filler needs one region per source region");
  for (const [i, r] of regions.entries()) {
    const s = sources[i];
    if (r.sourceRegion !== i || r.sourcePage !== 0 || r.length !== s.pages * s.pageSize || r.fillAddress !== r.base || r.fillAddress === 0)
      throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `regions[${i}] must be source region ${i} whole, with fillAddress equal to base`);
  }
}

function localSupply(local: LocalImageSupply, sourceRegions: readonly SourceRegion[]) {
  if (!Array.isArray(local.image) || local.image.length !== sourceRegions.length)
    throw new PostcopyError(ErrorCode.IMAGE_INVALID, `a local image needs one region per source region (${sourceRegions.length})`);
  for (const [i, spec] of local.image.entries()) {
    if (spec.length !== sourceRegions[i].pages * sourceRegions[i].pageSize || spec.pageSize !== sourceRegions[i].pageSize)
      throw new PostcopyError(ErrorCode.IMAGE_INVALID, `image region ${i} does not match source region ${i}`);
  }
  return {
    image: [...local.image],
    window: windowOf(local.window),
    background: local.background === true,
    ...(local.prefetch ? { prefetch: checkEntries(local.prefetch) } : {}),
  };
}

function storeSupply(local: StoreImageSupply, sourceRegions: readonly SourceRegion[]) {
  const sizes = local.store?.chunkBytes;
  const chunks = local.store?.chunks;
  if (!Array.isArray(sizes) || sizes.length !== sourceRegions.length || !Array.isArray(chunks) || chunks.length !== sourceRegions.length)
    throw new PostcopyError(ErrorCode.IMAGE_INVALID, `a store image needs a chunk size and chunk names per source region (${sourceRegions.length})`);
  for (const [i, n] of sizes.entries()) {
    validateInteger(n, `store.chunkBytes[${i}]`, 4096, MAX_CHUNK_BYTES);
    if ((n & (n - 1)) !== 0 || n < sourceRegions[i].pageSize)
      throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `store.chunkBytes[${i}] must be a power of two of whole pages`);
    const want = Math.ceil((sourceRegions[i].pages * sourceRegions[i].pageSize) / n) * 32;
    if (!(chunks[i] instanceof Uint8Array) || chunks[i].length !== want)
      throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `store.chunks[${i}] must hold 32 bytes per chunk (${want} bytes)`);
  }
  const cacheDir = local.store.cacheDir;
  if (cacheDir !== undefined && (typeof cacheDir !== 'string' || cacheDir === ''))
    throw new PostcopyError(ErrorCode.USAGE, 'store.cacheDir must be a directory');
  return {
    store: { chunkBytes: [...sizes], chunks: [...chunks], ...(cacheDir ? { cacheDir } : {}) },
    window: windowOf(local.window),
    background: local.background === true,
    ...(local.prefetch ? { prefetch: checkEntries(local.prefetch) } : {}),
  };
}

function windowOf(window: TransferOptions['window']) {
  return {
    forward: validateInteger(window.forward, 'window.forward', 0, MAX_WINDOW),
    backward: validateInteger(window.backward, 'window.backward', 0, MAX_WINDOW),
  };
}

function checkEntries(entries: Uint8Array): Uint8Array {
  if (!(entries instanceof Uint8Array) || entries.length % 8 !== 0) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, 'prefetch entries must be 8 bytes each');
  return entries;
}
