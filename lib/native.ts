// The one module that loads the addon. Everything else imports the typed
// wrappers in lib/; nothing else touches the .node file.
import { createRequire } from 'node:module';
import { ErrorCode, PostcopyError } from './errors.js';

export interface Progress {
  /** Bytes done before the call stopped. */
  bytes: number;
  /** null when the whole range was done; 'EAGAIN' or 'EEXIST' when it stopped short. */
  code: null | 'EAGAIN' | 'EEXIST';
}

export interface RawEvent {
  type: 'pagefault' | 'fork' | 'remap' | 'remove' | 'unmap' | 'unknown';
  address?: number;
  flags?: number;
  threadId?: number;
  fd?: number;
  from?: number;
  to?: number;
  length?: number;
  start?: number;
  end?: number;
  event?: number;
}

export interface NativeMapping {
  readonly address: number;
  readonly length: number;
  readonly mapped: boolean;
  view(): ArrayBuffer;
  unmap(): void;
}

export interface TouchResult {
  latencyNs: Float64Array;
  firstBytes: Uint8Array;
  totalNs: number;
  startCpu: number;
  endCpu: number;
}

/** What every record a data-plane thread reports carries (see addon/events.h). */
interface NativeEventBase {
  channel?: 'urgent' | 'bulk';
  /** One of lib/errors.ts, or an errno name (then with errno and syscall). */
  code?: string;
  message?: string;
  errno?: number;
  syscall?: string;
  /** The set of data channels the event came from (0: none, e.g. a memory event). */
  generation: number;
}

/** Every record the data-plane threads report, by type, with its fields. */
export type NativeEvent = NativeEventBase &
  (
    | { type: 'complete'; elapsedNs: number }
    | { type: 'background-done' }
    | { type: 'store-wanted' }
    /** The engine's own fetch of a fault's piece (id 0) or of a group taken ahead (its id) ended (message: why it was handed back, when gaveBack). */
    | { type: 'store-fetched'; id: number; keptBytes: number; gaveBack: 0 | 1 }
    | { type: 'remove' | 'unmap'; start: number; end: number }
    | { type: 'remap'; from: number; to: number; length: number; followed: 0 | 1 }
    | { type: 'fork'; fd: number }
    | { type: 'unexpected-fault'; address: number }
    | { type: 'unknown-event'; event: number }
    /** A data channel ended (EOF, or an errno). */
    | { type: 'closed' }
    /** A data channel failed: a protocol violation (code ERR_...) or a failed write. */
    | { type: 'error' }
    /** UFFDIO_COPY / UFFDIO_ZEROPAGE failed (errno, syscall 'ioctl'). */
    | { type: 'install-failed' }
    /** The process owning the memory is gone (ESRCH). */
    | { type: 'target-gone' }
    /** The userfaultfd was hung up or could not be read. */
    | { type: 'uffd-closed' }
    /** A live source's precopy round went out (source). */
    | { type: 'round-sent'; pages: number; bytes: number; ns: number }
    /** A live source's discard round went out: the pages the destination dropped (source). */
    | { type: 'discard-round-sent'; pages: number; ns: number; round: number }
    /** Every discard run of a live source's discard round `round` is applied here (destination). */
    | { type: 'discards-dropped'; round: number }
    /** A live source sent its discards and switchover marker (source). */
    | { type: 'switched-over'; discarded: number; held: number }
    /** The switchover marker arrived: the workload may run here now (destination). */
    | { type: 'switchover'; discarded: number; rewritten: number }
    /** QEMU's stream: the preamble (device state, run) is out (source). */
    | { type: 'running'; afterNs: number }
    /** QEMU's stream: the destination said SHUT (source). */
    | { type: 'done'; status: number }
  );

export interface ServedRegionSpec {
  source: NativeMapping | Uint8Array;
  sourceIsMapping: boolean;
  offset: number;
  length: number;
  pageSize: number;
  knownZero?: Uint8Array;
  /** Pages per unit the destination installs (a huge page): runs hold whole units (default 1). */
  unit?: number;
}

export interface SourceStats {
  requests: number;
  pagesRequested: number;
  pagesResent: number;
  pagesAlreadyInFlight: number;
  pagesWindow: number;
  pagesBackground: number;
  pagesPrefetched: number;
  zeroPages: number;
  bytesSent: number;
  pagesSent: number;
  totalPages: number;
  backgroundDoneNs: number;
  /** A live source: pages sent in precopy rounds (a page written and sent again counts each time). */
  pagesPrecopied: number;
  /** A live source: pages the destination was told to drop at the switchover (written since they were sent). */
  pagesDiscarded: number;
  /** Release as sent: pages sent and not yet confirmed installed now, the most there ever were, the budget (0: none), and how often the background waited for it. */
  pagesUnconfirmed: number;
  pagesUnconfirmedPeak: number;
  unconfirmedBudget: number;
  budgetWaits: number;
  /** Across a link with a destination that takes them: bulk runs sent packed, their pages' bytes, and what they took on the wire (headers and lengths included). */
  packedRuns: number;
  packedRawBytes: number;
  packedWireBytes: number;
  /** Across a link: the bulk channel's pacer (its window now, the round trips it last saw, how often and how long it held the background back). */
  backgroundPacing?: { windowBytes: number; minRttUs: number; rttUs: number; waits: number; waitMs: number };
}

export interface NativePageServerSession {
  start(): void;
  stop(): void;
  markHeld(region: number, bitmap: Uint8Array): void;
  stats(): SourceStats;
  prefetch(entries: Uint8Array): void;
  startBackground(): void;
  /** A live source: pages to send now, as u64 LE pairs (region << 48 | first page, count). */
  precopyRound(ranges: Uint8Array): void;
  discardRound(ranges: Uint8Array): void;
  /** A live source, its workload paused: the pages written since the last round was queued (same layout). */
  switchover(written: Uint8Array): void;
  /** Release as sent: bytes [offset, +bitmap.length) of region `region`'s bitmap of pages the destination holds for good. */
  confirm(region: number, offset: number, bitmap: Uint8Array): void;
}

/** addon/qemu_source.cc: QEMU's postcopy stream from a snapshot, written by native threads. */
export interface NativeQemuRamStream {
  start(): void;
  stop(): void;
  stats(): {
    requests: number;
    requestP50Ns: number;
    requestP90Ns: number;
    requestP99Ns: number;
    pagesOnDemand: number;
    pagesWindow: number;
    pagesBackground: number;
    zeroPages: number;
    bytesSent: number;
    preambleNs: number;
    residentNs: number;
    totalPages: number;
  };
}

export interface DestinationStats {
  faults: number;
  faultsOnResidentPages: number;
  /** MINOR mode: faults on pages already in the page cache, mapped with UFFDIO_CONTINUE (nothing copied). */
  minorFaults: number;
  pagesRequested: number;
  pagesInstalledRequested: number;
  pagesInstalledWindow: number;
  pagesInstalledBackground: number;
  /** Pages of a replayed working set (prefetch), installed before any thread faulted on them. */
  pagesInstalledPrefetch: number;
  zeroPages: number;
  duplicatePages: number;
  bytesReceived: number;
  residentPages: number;
  totalPages: number;
  blockedNs: number;
  elapsedNs: number;
  fullResidencyNs: number;
  copyRetries: number;
  unexpectedFaults: number;
  memoryEvents: number;
  removedPages: number;
  zeroFilledAfterRemove: number;
  pagesOutsideRegions: number;
  /** Bulk runs that came packed (and were unpacked before install). */
  packedRuns: number;
  /** Aligned 2 MiB of own memory that went in whole as one transparent huge page (installHugePages). */
  hugeInstalls: number;
  /** Pages asked for and not yet resident (or given back). */
  outstandingRequests: number;
  /** Requests sent again on new data channels after a pause. */
  requestsResent: number;
  /** Pages given up on with UFFDIO_POISON (a touch raises SIGBUS). */
  poisonedPages: number;
  /** How many times data channels were attached. */
  channelGeneration: number;
  /** A live source: pages installed or written over by its precopy rounds. */
  pagesPrecopied: number;
  /** ... of which written over (sent again: the workload had written them). */
  pagesRewritten: number;
  /** Pages dropped at the switchover (written at the source after they were sent). */
  pagesDiscarded: number;
  /** When the switchover marker arrived, from the engine's start (0: not yet, or not a live source). */
  switchoverNs: number;
  faultLatency: { count: number; p50Ns: number; p90Ns: number; p99Ns: number; maxNs: number; meanNs: number; sumNs: number };
}

export interface NativeFaultEngine {
  start(): void;
  stop(): void;
  attachChannels(urgentFd: number, bulkFd: number, keys?: { urgentDown: Buffer; urgentUp: Buffer; bulkDown: Buffer }): number;
  detachChannels(): void;
  poisonMissing(): number;
  stats(): DestinationStats;
  receivedBitmap(region: number): Buffer;
  heldBitmap(sourceRegion: number): Buffer;
  markResident(region: number, bitmap: Uint8Array): number;
  installedChecksum(): InstalledChecksum[];
  latencyBuckets(boundsNs: number[]): number[];
  prefetch(entries: Uint8Array): void;
  startBackground(): void;
  faultedPages(): Buffer;
  takeStorePieces(ahead: number, cacheBytes: number, background: boolean): { pieces: StorePiece[]; fromCache: number };
  installPiece(region: number, piece: number, why: number, data: Uint8Array | null): boolean;
  storePiecesFromCache(): number;
  fetchStoreInEngine(config: StoreGetsConfig): void;
  fetchAheadInEngine(pieces: StorePiece[], id: number): boolean;
  storeInEngine(): StoreInEngineStats;
}

/** How a store engine reaches the store itself (addon/store_getter.h): plain HTTP, path-style, signed with these keys. */
export interface StoreGetsConfig {
  /** Numeric. */
  address: string;
  ipv6: boolean;
  port: number;
  /** The Host header, as signed. */
  host: string;
  region: string;
  keyId: string;
  secret: string;
  /** '' when none. */
  token: string;
  /** Per pack: its object's path as signed (/BUCKET/KEY, encoded). */
  packs: string[];
  /** Per source region: 24 bytes a chunk, i64 pack index (-1: none), u64 offset, u64 length, little-endian. */
  places: Uint8Array[];
  timeoutMs: number;
  connections: number;
}

/** What a store engine's own fetches did: GETs, bytes, pieces installed, pieces handed to JavaScript, bytes kept in the host's cache, chunks another fetch kept first, the GETs' time; fetching: pieces queued or under way. */
export interface StoreInEngineStats {
  gets: number;
  bytesFetched: number;
  pieces: number;
  gaveBack: number;
  keptBytes: number;
  fromCache: number;
  /** The faults' successful GETs' time, summed: from the request to the chunk checked (decoded, its hash compared). */
  getNs: number;
  /** Files in the host's cache that failed their check: removed, the chunk fetched again. */
  damaged: number;
  /** The faults' pieces among `pieces` (getNs is theirs). */
  faultPieces: number;
  fetching: number;
}

/** A piece of a store image the engine wants (addon/store_supply.h): source pages [sourceFirst, +sourceCount) of sourceRegion. */
export interface StorePiece {
  region: number;
  piece: number;
  sourceRegion: number;
  sourceFirst: number;
  sourceCount: number;
  /** Reason (lib/wire.ts): requested, window, prefetch or background. */
  why: number;
}

/** One source region's installed-pages checksum at the destination (addon/page_checksum.h). */
export interface InstalledChecksum {
  region: number;
  sum: bigint;
  /** Pages in the sum. */
  pages: number;
  /** The region's pages left out, as flat [first, count, ...] ranges; null when too fragmented to send. */
  skip: number[] | null;
}

export interface NativeAddon {
  uffdOpen(flags: number): { fd: number; via: 'syscall' | '/dev/userfaultfd' | 'syscall-user-mode-only' };
  uffdApi(fd: number, features: number): { available: number; ioctls: bigint };
  uffdRegister(fd: number, start: number, length: number, mode: number): bigint;
  uffdUnregister(fd: number, start: number, length: number): void;
  uffdCopy(fd: number, dst: number, src: Uint8Array, srcOffset: number, length: number, mode: number): Progress;
  uffdZeroPage(fd: number, start: number, length: number, mode: number): Progress;
  uffdContinue(fd: number, start: number, length: number, mode: number): Progress;
  uffdPoison(fd: number, start: number, length: number, mode: number): Progress;
  uffdMove(fd: number, dst: number, src: number, length: number, mode: number): Progress;
  uffdWake(fd: number, start: number, length: number): void;
  uffdWriteProtect(fd: number, start: number, length: number, mode: number): void;
  /** PAGEMAP_SCAN: the written pages of [start, end) as u64 LE [start, end) address pairs, write-protected again. */
  pagemapScanWritten(pagemapFd: number, start: number, end: number): Buffer;
  uffdReadEvents(fd: number, max: number): RawEvent[];
  uffdConstants: Record<'UFFD_USER_MODE_ONLY' | 'O_NONBLOCK' | 'O_CLOEXEC', number>;

  Mapping: new (length: number, prot: number, flags: number, fd: number, offset: number, address: number) => NativeMapping;
  memfdCreate(name: string, flags: number): number;
  addSeals(fd: number, seals: number): void;
  getSeals(fd: number): number;
  madvise(address: number, length: number, advice: number): void;
  fallocate(fd: number, mode: number, offset: number, length: number): void;
  fileExtents(fd: number, size: number): number[];
  /** `shares`, when given (at least `count` long), receives each page's contribution. */
  pageChecksum(bytes: Uint8Array, pageSize: number, region: number, firstPage: number, count: number, shares?: BigUint64Array): bigint;
  /** The check of a cached chunk file's content (addon/chunk_cache.h). */
  cacheCheck(bytes: Uint8Array): bigint;
  /** Writes a cached chunk's file `folder/name` (content, then the footer with `check`) on libuv's pool, never seen half-written; false when one of that name was there. */
  cacheKeep(folder: string, name: string, content: Uint8Array, check: bigint): Promise<boolean>;
  /** Locks (or unlocks) bytes [at, at + length) of `fd` for writing, as an open file description lock; never waits: false when another open file holds them. */
  rangeLock(fd: number, at: number, length: number, lock: boolean): boolean;
  memoryConstants: Record<string, number>;
  /** The wire and QEMU stream constants of addon/wire.h and addon/qemu_stream.h, by group and C++ name (test/constants.test.ts). */
  constants(): {
    wire: Record<'Kind' | 'Reason' | 'sizes', Record<string, number>>;
    qemu: Record<'Stream' | 'Section' | 'RamFlag' | 'Command' | 'ReturnPath', Record<string, number>>;
  };

  /** Whether runs can be packed and unpacked here (the runtime libzstd.so.1 opened). */
  packingAvailable(): boolean;
  /** A store chunk compressed with zstd (one frame); null when zstd is not here or it does not save an eighth. */
  zstdPack(bytes: Uint8Array): Buffer | null;
  /** A zstd frame decompressed to exactly `length` bytes (at most 1 GiB); null when it is damaged or not that long, or zstd is not here. */
  zstdUnpack(packed: Uint8Array, length: number): Buffer | null;

  socketPair(seqpacket?: boolean): [number, number];
  sendWithFds(socket: number, payload: Uint8Array, fds: number[]): number;
  sendDatagram(path: string, payload: Uint8Array): number;
  receiveNow(socket: number, maxBytes: number, maxFds: number): { payload: Buffer; fds: number[]; truncated: boolean };
  FdWatcher: new (onOutcome: (outcome: { id: number; ready: boolean }) => void) => {
    watch(fd: number, timeoutMs: number, id: number): void;
    cancel(id: number): void;
    close(): void;
  };
  peerCredentials(fd: number): { pid: number; uid: number; gid: number };
  pollFd(fd: number, events: number, timeoutMs: number): Promise<number>;
  pollConstants: Record<'POLLIN' | 'POLLOUT' | 'POLLERR' | 'POLLHUP' | 'MAX_FDS', number>;

  touchPages(address: number, pageSize: number, order: Uint32Array, write: boolean, cpu: number, mapping?: NativeMapping): Promise<TouchResult>;
  shuffledOrder(pages: number, seed: number): Uint32Array;

  takeSocketFd(fd: number): number;

  PageServerSession: new (options: {
    regions: ServedRegionSpec[];
    urgentFd: number;
    bulkFd: number;
    windowForward: number;
    windowBackward: number;
    background: boolean;
    rateBytesPerSecond: number;
    keys?: { urgentDown: Buffer; urgentUp: Buffer; bulkDown: Buffer };
    /** A live source: the session starts in precopy (rounds, then the switchover). */
    precopy?: boolean;
    /** A live source: each discard round ends with a mark the destination answers (`dropped`). */
    discardMarks?: boolean;
    /** The destination takes packed runs: across a link, bulk runs go packed while the link is slower than packing. */
    packRuns?: boolean;
    /** Release as sent: at most this many pages sent and not yet confirmed (confirm()); at least one run's pages. */
    unconfirmedBudget?: number;
    onEvent: (event: NativeEvent) => void;
  }) => NativePageServerSession;

  QemuRamStream: new (options: {
    fd: number;
    preamble: Buffer;
    section: number;
    blocks: { name: string; spec: ServedRegionSpec }[];
    windowForward: number;
    windowBackward: number;
    background: boolean;
    onEvent: (event: NativeEvent) => void;
  }) => NativeQemuRamStream;

  FaultEngine: new (options: {
    uffd: number;
    sourceRegions: { pages: number; pageSize: number }[];
    regions: { base: number; length: number; pageSize: number; sourceRegion: number; sourcePage: number; fillAddress: number }[];
    cpu: number;
    checksumInstalled: boolean;
    recordFaults: boolean;
    image?: ServedRegionSpec[];
    /** Pages come from a snapshot store, fetched by JS (client/store-feeder.ts). */
    store?: { chunkBytes: number[] };
    window?: { forward: number; backward: number };
    background?: boolean;
    prefetch?: Uint8Array;
    /** A template's filler (uffd -1). */
    fillsTemplate: boolean;
    /** A live source: precopy runs and discards come before its switchover marker. */
    precopy?: boolean;
    /** The regions are this process's own memory: precopy writes over and drops pages in place. */
    ownMemory?: boolean;
    /** A template's clone: the filler's native engine. */
    template?: NativeFaultEngine;
    onEvent: (event: NativeEvent) => void;
  }) => NativeFaultEngine;
}

/**
 * Why the addon could not be loaded (an install with scripts off, or a build
 * that failed), or null. Then every use of `native` throws
 * ERR_ADDON_NOT_BUILT in one sentence, and what needs no addon (the CLI's
 * --help and --version, the library's types) still works.
 */
export let addonError: Error | null = null;

function load(): NativeAddon {
  try {
    return createRequire(import.meta.url)('#addon') as NativeAddon;
  } catch (err) {
    addonError = err as Error;
    const missing = () => {
      throw addonNotBuilt();
    };
    return new Proxy({} as NativeAddon, { get: missing, construct: missing, apply: missing });
  }
}

/** The error every use of the addon throws when it could not be loaded. */
export function addonNotBuilt(): PostcopyError {
  return new PostcopyError(
    ErrorCode.ADDON_NOT_BUILT,
    `the native addon (build/Release/uffd_postcopy.node) is not built: build it with "npm rebuild uffd-postcopy" (it needs g++ and cmake), or install without --ignore-scripts${addonError ? ` (${addonError.message.split('\n')[0]})` : ''}`,
  );
}

export const native: NativeAddon = load();
