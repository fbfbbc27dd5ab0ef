// The one place a destination's page session is opened, from a description of
// where the pages come from and of the memory they go into:
//
//   from                           into own memory (restore)        into a VMM's guest (handle)
//   a source (its address)         DestinationSession               DestinationSession
//   a local image                  LocalSession                     LocalSession
//   a template (its clone)         -                                LocalSession.openClone
//   memory taken in place          mapped here, nothing faults      LocalSession over the memory taken
//   an image in a snapshot store   StoreSession                     StoreSession
//
// Memory taken in place falls back to a source session when the source does
// not offer it (TCP, or an image that is not shared memory). The memory side
// (client/own-memory.ts, client/guest-memory.ts, a template's memfds) builds
// the fault engine once the image's regions are known; nothing else decides
// which session kind to open.
import { closeSync, fstatSync } from 'node:fs';
import { ErrorCode, PostcopyError, asCodedError } from '../lib/errors.js';
import { mapFile, type Mapping } from '../lib/memory.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import type { RegionInfo } from '../lib/protocol.js';
import { Image } from '../lib/image.js';
import { DestinationSession, type DestinationSessionOptions, type EngineFactory, type PageSession } from './session.js';
import { LocalSession, type CloneSource, type LocalSessionOptions } from './local-session.js';
import { SourceConnection } from './source-connection.js';
import { StoreSession, type StoreSessionOptions } from './store-session.js';

/** Where the pages come from. */
export type PagesFrom =
  | ({ kind: 'source' } & DestinationSessionOptions)
  | ({ kind: 'image' } & LocalSessionOptions)
  | { kind: 'template'; template: CloneSource; logger?: Logger }
  | ({ kind: 'store' } & StoreSessionOptions)
  /** A source on this host whose image is shared memory: its memory itself (its fds); a source session when it does not offer it. */
  | ({ kind: 'in-place' } & DestinationSessionOptions);

/** The memory the pages go into: it builds (and starts) the engine over itself once the image's regions are known. */
export interface MemoryTarget {
  /** own: this process's region (a restore); guest: a VMM's guest regions; template: a template's memfds. */
  readonly kind: 'own' | 'guest' | 'template';
  readonly engineFor: EngineFactory;
  /** Per image region, the page size the source must send in (a guest mapping huge pages asks for whole huge pages). */
  readonly pageSizesFor?: (regions: RegionInfo[]) => number[];
}

/** The source's memory, taken in place and mapped here (into own memory): nothing faults, nothing is copied. */
export interface TakenMemory {
  regions: RegionInfo[];
  mappings: Mapping[];
  /** The files the memory came from (their device and inode), e.g. to refuse writing over them. */
  files: { dev: number; ino: number }[];
  /** From asking the source to the memory being mapped here. */
  tookMs: number;
}

export type OpenedSession = { kind: 'session'; session: PageSession } | { kind: 'taken'; memory: TakenMemory };

/** Opens the page session `from` describes over `into`; memory taken in place into own memory is mapped, not served. */
export async function openSession(from: PagesFrom, into: MemoryTarget): Promise<OpenedSession> {
  const log = from.logger ?? silentLogger;
  const build = into.engineFor;
  switch (from.kind) {
    case 'image': {
      const { kind: _, ...options } = from;
      return { kind: 'session', session: LocalSession.open(options, build) };
    }
    case 'template':
      return { kind: 'session', session: LocalSession.openClone(from.template, { logger: log }, build) };
    case 'store': {
      const { kind: _, ...options } = from;
      return { kind: 'session', session: await StoreSession.open(options, build) };
    }
    case 'in-place': {
      const { kind: _, ...options } = from;
      if (into.kind === 'own') {
        const memory = await mapInPlace(options, log);
        if (memory) return { kind: 'taken', memory };
        log.warn(
          { source: String(options.source) },
          'the source does not offer its memory in place (TCP, or an image that is not shared memory): copying instead',
        );
      } else {
        const image = await imageInPlace(options, log);
        if (image) return { kind: 'session', session: localOverTaken(options, image, build) };
      }
      return { kind: 'session', session: await openSource(options, into) };
    }
    case 'source': {
      const { kind: _, ...options } = from;
      return { kind: 'session', session: await openSource(options, into) };
    }
  }
}

function openSource(options: DestinationSessionOptions, into: MemoryTarget): Promise<DestinationSession> {
  // A restore's own memory can follow a live source's precopy; a VMM's guest memory cannot.
  const precopy = into.kind === 'own' ? { precopy: true } : {};
  return DestinationSession.open({ ...precopy, ...options, ...(into.pageSizesFor ? { pageSizesFor: into.pageSizesFor } : {}) }, into.engineFor);
}

/** A local session over memory taken in place: the image (and its fds) close with the session. */
function localOverTaken(options: DestinationSessionOptions, taken: { image: Image; fds: number[] }, build: EngineFactory): LocalSession {
  const release = () => {
    taken.image.close();
    for (const fd of taken.fds) closeSync(fd);
  };
  let session: LocalSession;
  try {
    session = LocalSession.open({ ...options, image: taken.image }, build);
  } catch (err) {
    release();
    throw err;
  }
  // Closed: the engine has stopped, so nothing reads the memory any more.
  session.on('state', (to: string) => {
    if (to === 'closed') release();
  });
  return session;
}

/** In place, for a VMM: the source's memory (its fds) as an image; null when the source does not offer it (or taking it failed: copied then). */
async function imageInPlace(options: DestinationSessionOptions, log: Logger): Promise<{ image: Image; fds: number[] } | null> {
  const taken = await SourceConnection.takeMemory({ source: options.source, ...(options.token ? { token: options.token } : {}) }).catch((err) => {
    log.warn({ code: asCodedError(err).code, err: (err as Error).message }, 'taking the source memory in place failed; copying instead');
    return null;
  });
  if (!taken) {
    log.info('the source does not offer its memory in place (TCP, or an image that is not shared memory): copying');
    return null;
  }
  try {
    const image = Image.open(taken.fds.map((fd, i) => ({ fd, name: taken.regions[i].name })));
    if (image.fingerprint !== taken.fingerprint) {
      image.close();
      throw new PostcopyError(ErrorCode.IMAGE_MISMATCH, 'the memory the source handed over is not the image it serves');
    }
    log.info({ regions: taken.fds.length, bytes: image.totalBytes }, "took the source's memory in place: faults are served from it here");
    return { image, fds: taken.fds };
  } catch (err) {
    for (const fd of taken.fds) closeSync(fd);
    throw err;
  }
}

/**
 * In place, into own memory: takes the source's shared-memory fds and maps
 * them shared: the memory is the source's own, no page is copied and nothing
 * faults. Null when the source does not offer it.
 */
async function mapInPlace(options: DestinationSessionOptions, log: Logger): Promise<TakenMemory | null> {
  const started = process.hrtime.bigint();
  const token = options.token;
  const taken = await SourceConnection.takeMemory({ source: options.source, ...(token ? { token } : {}) });
  if (!taken) return null;
  const mappings: Mapping[] = [];
  let files: { dev: number; ino: number }[];
  try {
    files = taken.fds.map((fd) => fstatSync(fd));
    // Shared: the memory is ours now. (A source that handed over a read-only fd keeps its image: mapped private, a page is copied only when written.)
    for (const [i, r] of taken.regions.entries()) {
      try {
        mappings.push(mapFile(taken.fds[i], r.length, { shared: true }));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EACCES') throw err;
        mappings.push(mapFile(taken.fds[i], r.length, { shared: false }));
      }
    }
  } catch (err) {
    for (const m of mappings) m.unmap();
    throw err;
  } finally {
    for (const fd of taken.fds) closeSync(fd); // the mappings keep the memory
  }
  const tookMs = Number(process.hrtime.bigint() - started) / 1e6;
  log.info({ regions: mappings.length, bytes: mappings.reduce((n, m) => n + m.length, 0), tookMs }, 'took the source memory in place: nothing copied');
  return { regions: taken.regions, mappings, files, tookMs };
}
