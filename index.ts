// The public API: what `import { ... } from 'uffd-postcopy'` gives. docs/API.md
// documents each export, its options, events and errors.
export { Image, type RegionSource, type ImageRegion } from './lib/image.js';
export { PageServer, type PageServerOptions } from './server/page-server.js';
export { Destination, type DestinationOptions, type RestoredRegion } from './client/destination.js';
export { DestinationSession, type DestinationSessionOptions, type DestinationState, type RecoveryOptions, type RecoveryStatus } from './client/session.js';
export { VmmHandler, type VmmHandlerOptions, type VmmSessionSummary, type GuestRegion } from './client/vmm-handler.js';
export { HandlerSupervisor, type SupervisorOptions } from './client/handler-supervisor.js';
export type { InstalledCheck } from './client/installed-checksum.js';
export { FaultEngine, type FaultEngineOptions, type TargetRegion, type SourceRegion, type MemoryEvent, type ChannelFailure } from './client/fault-engine.js';
export type { RestoreReport } from './client/report.js';
export { DEFAULT_TRANSFER, MAX_WINDOW, type TransferOptions } from './lib/transfer.js';
export { ErrorCode, PostcopyError, type ErrorCodeValue, type CodedError } from './lib/errors.js';
export { parseAddress, formatAddress, type Address } from './lib/address.js';
export { readToken, defaultTokenPath } from './lib/token.js';
export { Userfaultfd, Feature, availableFeatures, type FeatureName, type RegisterMode, type UffdEvent } from './lib/uffd.js';
export { Mapping, PAGE_SIZE, mapAnonymous, mapFile, memfdCreate, addSeals, getSeals, madvise, punchHole, fileExtents } from './lib/memory.js';
export { sendFds, receiveFds, peerCredentials, socketPair } from './lib/fd-passing.js';
export { touchPages, shuffledOrder, coldStartOrder } from './lib/workload.js';
export { LocalSession, type LocalSessionOptions } from './client/local-session.js';
export { SourceConnection } from './client/source-connection.js';
export { readWorkingSet, writeWorkingSet, type WorkingSet } from './client/working-set.js';
export { createLogger, silentLogger, type Logger } from './lib/logger.js';
export { SnapshotStore, type SnapshotStoreOptions, type PushReport, type GcReport, type ImageEntry } from './lib/store/snapshot-store.js';
export { ChunkCache, type ChunkCacheOptions } from './lib/store/chunk-cache.js';
export { TenantKey } from './lib/store/tenant.js';
export { parseStoreUrl, parseImageUrl, type StoreAddress, type ImageAddress } from './lib/store/address.js';
export { StoreSession, type StoreSessionOptions } from './client/store-session.js';
