// This process's own memory as a session's target (a restore): one anonymous
// region per image region, registered with a userfaultfd of our own for
// MISSING faults, served by a fault engine built once the regions are known.
import { PAGE_SIZE, mapAnonymous, type Mapping } from '../lib/memory.js';
import { Userfaultfd, availableFeatures } from '../lib/uffd.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import type { RegionInfo } from '../lib/protocol.js';
import { FaultEngine } from './fault-engine.js';
import type { EngineFactory } from './session.js';
import type { MemoryTarget } from './open-session.js';

export interface OwnMemoryOptions {
  logger?: Logger;
  /** Pin the fault engine's threads to this CPU. */
  engineCpu?: number;
  /** Keep the pages faulted on while missing, in first-touch order (the engine's recordFaults). */
  recordWorkingSet?: boolean;
  /**
   * Back the regions with transparent huge pages: map them on 2 MiB
   * boundaries, and move each aligned 2 MiB that a run fills whole in as one
   * huge page (UFFDIO_MOVE). Fewer TLB misses for the workload afterwards;
   * no faster a restore on this machine (README, "Whole huge pages"). Off by
   * default; without the kernel's MOVE, or with a live source's precopy,
   * small pages.
   */
  transparentHugePages?: boolean;
}

export interface RestoredRegion {
  info: RegionInfo;
  mapping: Mapping;
}

const HUGE_PAGE = 2 << 20;

let movable: boolean | undefined;
/** Whether this kernel's userfaultfd can move pages (UFFD_FEATURE_MOVE, Linux 6.8). Probed once. */
function canMovePages(): boolean {
  return (movable ??= availableFeatures().includes('MOVE'));
}

/**
 * Anonymous memory starting on a 2 MiB boundary, so each aligned 2 MiB of the
 * region can take a huge page. Mapped where a larger mapping found room; if
 * something else took that place meanwhile, wherever the kernel puts it.
 */
function mapHugeAligned(length: number): Mapping {
  if (length < HUGE_PAGE) return mapAnonymous(length, { noReserve: true });
  const probe = mapAnonymous(length + HUGE_PAGE, { noReserve: true });
  const address = Math.ceil(probe.address / HUGE_PAGE) * HUGE_PAGE;
  probe.unmap();
  try {
    return mapAnonymous(length, { noReserve: true, address });
  } catch {
    return mapAnonymous(length, { noReserve: true });
  }
}

export class OwnMemory implements MemoryTarget {
  readonly kind = 'own';
  readonly engineFor: EngineFactory;
  #uffd: Userfaultfd | null = null;
  #regions: RestoredRegion[] = [];

  constructor(options: OwnMemoryOptions) {
    const log = options.logger ?? silentLogger;
    this.engineFor = (infos, local, precopy) => {
      const uffd = Userfaultfd.open({ nonBlocking: true });
      this.#uffd = uffd;
      // A live source's precopy writes in place: small pages then.
      const hugePages = options.transparentHugePages === true && !precopy && canMovePages();
      if (options.transparentHugePages && !hugePages)
        log.info({ precopy, kernelMoves: canMovePages() }, 'transparent huge pages asked for: small pages instead (a live source, or no UFFDIO_MOVE here)');
      uffd.handshake(hugePages ? ['THREAD_ID', 'MOVE'] : ['THREAD_ID']);
      for (const info of infos) {
        const mapping = hugePages && info.pageSize === PAGE_SIZE ? mapHugeAligned(info.length) : mapAnonymous(info.length, { noReserve: true });
        this.#regions.push({ info, mapping });
        uffd.register(mapping.address, mapping.length, ['missing']);
      }
      const engine = new FaultEngine({
        uffd: uffd.fd,
        regions: this.#regions.map((r) => ({ base: r.mapping.address, length: r.mapping.length, pageSize: r.info.pageSize })),
        logger: log,
        recordFaults: options.recordWorkingSet === true,
        ...(local ? { local } : {}),
        // This memory is ours: a live source's precopy writes over it and drops pages in place.
        ...(precopy ? { precopy: true, ownMemory: true } : {}),
        ...(hugePages ? { installHugePages: true } : {}),
        ...(options.engineCpu !== undefined ? { cpu: options.engineCpu } : {}),
      });
      engine.start();
      return engine;
    };
  }

  /** The regions mapped so far (all of them once the engine was built). */
  get regions(): RestoredRegion[] {
    return this.#regions;
  }

  /** The userfaultfd the regions are registered with (once the engine was built). */
  get uffd(): Userfaultfd {
    return this.#uffd!;
  }

  /** A session that never opened: closes the userfaultfd and unmaps what was mapped. */
  discard(): void {
    this.#uffd?.close();
    for (const r of this.#regions) r.mapping.unmap();
    this.#regions = [];
  }
}
