// A VMM's guest memory as a session's target (`postcopy handle`): the guest
// regions of its handshake placed on the image, served through the
// userfaultfd it handed over; in MINOR mode its memory file is mapped here
// too and pages go into its page cache. Poisoning a guest that cannot be
// served is here too, done by the engine's native poisoning.
import { fstatSync } from 'node:fs';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import type { GuestRegion } from '../lib/vmm-handshake.js';
import { hasOverlap } from '../lib/validate.js';
import { mapFile, type Mapping } from '../lib/memory.js';
import type { Logger } from '../lib/logger.js';
import { native } from '../lib/native.js';
import { residentBitmap } from '../lib/pagemap.js';
import type { RegionInfo } from '../lib/protocol.js';
import { FaultEngine, type MemoryEvent, type TargetRegion } from './fault-engine.js';
import type { EngineFactory } from './session.js';
import type { MemoryTarget } from './open-session.js';

export interface GuestMemoryOptions {
  pid: number;
  uffd: number;
  /** MINOR mode: the guest's memory file. */
  memfd?: number;
  guest: GuestRegion[];
  /** A handler that died served this VMM before: what is resident stays, waiting threads are woken to fault again. */
  takeover: boolean;
  /** Keep the pages faulted on while missing (a working set is recorded). */
  recording: boolean;
  /** The VMM hung up meanwhile: no engine is built. */
  gone: () => boolean;
  logger: Logger;
}

export class GuestMemory implements MemoryTarget {
  readonly kind = 'guest';
  readonly engineFor: EngineFactory;
  readonly pageSizesFor: (regions: RegionInfo[]) => number[];
  /** MINOR mode: this process's mappings of the guest's regions, until release(). */
  #fills: Mapping[] = [];
  #built = false;

  constructor(o: GuestMemoryOptions) {
    const log = o.logger;
    // Huge-page guest regions: the source sends whole huge pages.
    this.pageSizesFor = (regions) => guestPageSizes(o.guest, regions);
    this.engineFor = (regions, local) => {
      this.#built = true;
      if (o.gone()) throw new PostcopyError(ErrorCode.PEER_GONE, 'the VMM hung up during set-up');
      const targets: TargetRegion[] = mapOntoImage(o.guest, regions);
      // MINOR mode: the guest's memory file, mapped here too; pages go into its page cache through it.
      o.guest.forEach((g, i) => {
        if (g.memfd_offset === undefined) return;
        const fill = mapGuestFile(o.memfd!, g, i);
        this.#fills.push(fill);
        targets[i].fillAddress = fill.address;
      });
      if (this.#fills.length)
        log.info({ regions: this.#fills.length }, "MINOR mode: pages go into the guest's memory file; faults are answered with UFFDIO_CONTINUE");
      const engine = new FaultEngine({
        uffd: o.uffd,
        sourceRegions: regions.map((r) => ({ pages: r.length / r.pageSize, pageSize: r.pageSize })),
        regions: targets,
        logger: log,
        checksumInstalled: true,
        recordFaults: o.recording,
        ...(local ? { local } : {}),
      });
      engine.on('memory-event', (e: MemoryEvent) => log.info(e, 'memory event'));
      if (o.takeover) {
        let found = 0;
        targets.forEach((t, i) => (found += engine.markResident(i, residentBitmap(o.pid, t.base, t.length, t.pageSize))));
        log.info({ residentPages: found }, 'took over a VMM from a handler that died; its resident pages are kept');
      }
      engine.start();
      // Faults the dead handler had read were lost with it: wake their threads so they fault again, to us.
      if (o.takeover) for (const t of targets) native.uffdWake(o.uffd, t.base, t.length);
      return engine;
    };
  }

  /** The image's regions were known and an engine was asked for: what failed after is the session's, not the source's reach. */
  get built(): boolean {
    return this.#built;
  }

  /** Unmaps this process's view of the guest's memory file; call once no engine thread can use it. */
  release(): void {
    for (const m of this.#fills.splice(0)) m.unmap();
  }
}

/**
 * Poisons every guest region whole (the source was never reached, or the VMM
 * was refused after it handed its userfaultfd over), with the engine's native
 * poisoning over each region; returns the bytes poisoned (pages found present
 * keep their contents). A region that cannot be described (misaligned) or
 * that the VMM no longer has is left as it is.
 */
export function poisonGuest(uffd: number, guest: readonly GuestRegion[]): number {
  let bytes = 0;
  for (const g of guest) {
    const pageSize = g.page_size ?? 4096;
    let engine: FaultEngine;
    try {
      engine = new FaultEngine({ uffd, regions: [{ base: g.base_host_virt_addr, length: g.size, pageSize }] });
    } catch {
      continue;
    }
    try {
      bytes += engine.poisonMissing() * pageSize;
    } catch {
      // a region the VMM no longer has: nothing to protect there
    } finally {
      engine.stop();
    }
  }
  return bytes;
}

/** Per image region, the largest page size a guest region on it uses (the image's own where none is larger). */
function guestPageSizes(guest: GuestRegion[], image: RegionInfo[]): number[] {
  const sizes = image.map((r) => r.pageSize);
  let start = 0;
  for (const [i, r] of image.entries()) {
    for (const g of guest) if (g.offset >= start && g.offset < start + r.length) sizes[i] = Math.max(sizes[i], g.page_size ?? 4096);
    if (r.length % sizes[i])
      throw new PostcopyError(
        ErrorCode.UNSUPPORTED,
        `image region ${i} (${r.length} bytes) is not whole ${sizes[i]}-byte pages: a guest cannot map it in huge pages`,
      );
    start += r.length;
  }
  return sizes;
}

/** A guest region's part of its memory file, mapped shared in this process (MINOR mode). */
function mapGuestFile(memfd: number, g: GuestRegion, i: number): Mapping {
  const size = fstatSync(memfd).size;
  const offset = g.memfd_offset!;
  if (offset % (g.page_size ?? 4096) || offset + g.size > size)
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i}: memfd_offset ${offset} + size ${g.size} does not fit the ${size}-byte memory file`);
  return mapFile(memfd, g.size, { offset, shared: true });
}

/**
 * Places each guest region on the source image: `offset` counts from the start
 * of the image (the source's regions laid end to end). A region must fall
 * inside one source region, be page-aligned, and overlap no other region.
 */
export function mapOntoImage(guest: GuestRegion[], image: RegionInfo[]): Required<Omit<TargetRegion, 'fillAddress'>>[] {
  const targets = guest.map((g, i) => {
    const pageSize = g.page_size ?? 4096;
    if (g.base_host_virt_addr % pageSize || g.size % pageSize || g.offset % pageSize) {
      throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} is not aligned to its ${pageSize}-byte pages`);
    }
    let start = 0;
    for (const r of image) {
      if (g.offset >= start && g.offset + g.size <= start + r.length) {
        // A guest page is one or more whole image pages (a 2 MiB huge page from a 4 KiB-page image).
        if (pageSize < r.pageSize)
          throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} uses ${pageSize}-byte pages, smaller than the image's ${r.pageSize}`);
        return { base: g.base_host_virt_addr, length: g.size, pageSize, sourceRegion: r.id, sourcePage: (g.offset - start) / r.pageSize };
      }
      start += r.length;
    }
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `region ${i} [${g.offset}, ${g.offset + g.size}) falls outside the ${start}-byte image`);
  });
  if (hasOverlap(guest.map((g) => [g.base_host_virt_addr, g.base_host_virt_addr + g.size])))
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'guest regions overlap in memory');
  if (hasOverlap(guest.map((g) => [g.offset, g.offset + g.size])))
    throw new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, 'guest regions overlap in the image');
  return targets;
}
