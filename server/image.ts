// What a source serves: one or more regions, each backed by a file (mapped
// read-only; holes found with SEEK_HOLE go out as zero runs without being
// read), a shared-memory file or memfd (the same, in place), or a Buffer.
import { randomBytes } from 'node:crypto';
import { closeSync, fstatSync, openSync, statfsSync } from 'node:fs';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { fileExtents, mapFile, PAGE_SIZE, type Mapping } from '../lib/memory.js';
import type { RegionChecksum, RegionInfo } from '../lib/protocol.js';
import type { ServedRegionSpec } from '../lib/native.js';
import { checksumHex, digestOf, imageFingerprint, pageChecksum } from '../lib/digest.js';

export type RegionSource = { name?: string; path: string } | { name?: string; fd: number } | { name?: string; buffer: Uint8Array };

export interface ImageRegion extends RegionInfo {
  /** What the native session reads pages from. */
  spec: ServedRegionSpec;
  /** Bytes of content (the region is this rounded up to whole pages). */
  contentLength: number;
  holes: number;
  /**
   * An open fd of the region's file when it is shared memory (tmpfs, a memfd,
   * hugetlbfs) and whole pages: a destination on this host may map it in
   * place (`in-place`) instead of having pages copied.
   */
  memoryFd?: number;
}

const TMPFS_MAGIC = 0x01021994;
const HUGETLBFS_MAGIC = 0x958458f6;

/** A memory image: regions served read-only to any number of destinations. */
export class Image {
  readonly regions: ImageRegion[];
  /** Identifies the image to a destination that resumes (lib/digest.ts). */
  readonly fingerprint: string;
  readonly #mappings: Mapping[];
  readonly #ownFds: number[];
  readonly #digests = new Map<number, Promise<string>>();
  readonly #checksums = new Map<number, Promise<bigint>>();
  #kept = false;

  private constructor(regions: ImageRegion[], mappings: Mapping[], ownFds: number[], live: string | null) {
    this.regions = regions;
    this.#mappings = mappings;
    this.#ownFds = ownFds;
    // A live image changes until its workload pauses: it is named afresh (or as its migration, once re-adopted), never by its contents.
    this.fingerprint = live !== null ? live : imageFingerprint(regions.map((r) => ({ length: r.length, pageSize: r.pageSize, bytes: regionBytes(r) })));
  }

  /**
   * `live`: the memory of a running workload (server/live.ts), read as it
   * changes: no page is taken for zero from the file's holes, and it is never
   * offered in place. Its digests are taken when asked (once it is paused).
   * Its fingerprint names the migration: fresh, or `migration` for the memory
   * of a workload re-adopted while paused for that migration.
   */
  static open(sources: readonly RegionSource[], options: { live?: boolean; migration?: string } = {}): Image {
    const live = options.live === true;
    if (!Array.isArray(sources) || sources.length === 0) throw new PostcopyError(ErrorCode.IMAGE_INVALID, 'an image needs at least one region');
    const regions: ImageRegion[] = [];
    const mappings: Mapping[] = [];
    const ownFds: number[] = [];
    try {
      sources.forEach((source, id) => {
        const region = 'buffer' in source ? fromBuffer(id, source.name, source.buffer) : fromFile(id, source, mappings, ownFds, live);
        regions.push(region);
      });
    } catch (err) {
      for (const m of mappings) m.unmap();
      for (const fd of ownFds) closeSync(fd);
      throw err;
    }
    return new Image(regions, mappings, ownFds, live ? (options.migration ?? `live-${randomBytes(16).toString('hex')}`) : null);
  }

  get totalBytes(): number {
    return this.regions.reduce((sum, r) => sum + r.length, 0);
  }

  /** SHA-256 of a region's whole length (content plus zero padding), computed once. */
  digest(id: number): Promise<string> {
    let d = this.#digests.get(id);
    if (!d) {
      d = digestOf(regionBytes(this.regions[id]));
      this.#digests.set(id, d);
    }
    return d;
  }

  /**
   * The installed-pages checksum of region `id` without the pages in `skip`
   * ([first, count] pairs, ascending): the whole region's sum, computed once,
   * less the skipped pages'. 16 hex digits.
   */
  async checksum(id: number, skip: readonly (readonly [number, number])[]): Promise<string> {
    const r = this.regions[id];
    const bytes = regionBytes(r);
    const pages = r.length / r.pageSize;
    const skipped = skip.reduce((n, [, c]) => n + c, 0);
    // Hash whichever is smaller: the pages kept, or the pages skipped (taken off the whole region's sum, kept once computed).
    // Once sums are kept (keepSums) the pages installed may be gone: always the skipped ones then.
    if (!this.#kept && pages - skipped <= skipped) return checksumHex(await pageChecksum(bytes, r.pageSize, id, complement(skip, pages)));
    return checksumHex((await this.#wholeChecksum(id)) - (await pageChecksum(bytes, r.pageSize, id, skip)));
  }

  /**
   * Takes every region's digest and whole checksum now, and keeps them: the
   * image may be freed as it is installed (release-as-sent), after which only
   * the pages a destination did not install can still be read.
   */
  async keepSums(): Promise<void> {
    this.#kept = true;
    await Promise.all(this.regions.map((r) => Promise.all([this.digest(r.id), this.#wholeChecksum(r.id)])));
  }

  #wholeChecksum(id: number): Promise<bigint> {
    let whole = this.#checksums.get(id);
    if (!whole) {
      const r = this.regions[id];
      whole = pageChecksum(regionBytes(r), r.pageSize, id, [[0, r.length / r.pageSize]]);
      this.#checksums.set(id, whole);
    }
    return whole;
  }

  /**
   * What a source answers to `done`: every region's SHA-256 and, for a
   * checked verify request (lib/protocol.ts checkVerify), the installed-pages
   * checksum of each region less its skipped pages.
   */
  async answerDone(verify?: { id: number; skip: [number, number][] }[]): Promise<{ regions: { id: number; sha256: string }[]; checksums?: RegionChecksum[] }> {
    const regions = await Promise.all(this.regions.map(async (r) => ({ id: r.id, sha256: await this.digest(r.id) })));
    if (!verify) return { regions };
    const checksums = await Promise.all(
      verify.map(async ({ id, skip }) => ({
        id,
        sum: await this.checksum(id, skip),
        pages: this.regions[id].length / this.regions[id].pageSize - skip.reduce((n, [, c]) => n + c, 0),
      })),
    );
    return { regions, checksums };
  }

  /** The regions' shared-memory fds, when every region has one (a destination on this host may then take the image in place); else null. */
  memoryFds(): number[] | null {
    return this.regions.every((r) => r.memoryFd !== undefined) ? this.regions.map((r) => r.memoryFd!) : null;
  }

  /** Unmaps the image; fails with ERR_MAPPING_BUSY while a session still serves from it. */
  close(): void {
    for (const m of this.#mappings) m.unmap();
    for (const fd of this.#ownFds.splice(0)) closeSync(fd);
  }
}

/** The pages of [0, pages) outside the ascending, disjoint ranges `skip`. */
function complement(skip: readonly (readonly [number, number])[], pages: number): [number, number][] {
  const out: [number, number][] = [];
  let at = 0;
  for (const [first, count] of skip) {
    if (first > at) out.push([at, first - at]);
    at = first + count;
  }
  if (at < pages) out.push([at, pages - at]);
  return out;
}

function regionBytes(r: ImageRegion): Uint8Array {
  const src = r.spec.source;
  if (r.spec.sourceIsMapping) return Buffer.from((src as { view(): ArrayBuffer }).view(), r.spec.offset, r.length);
  return (src as Uint8Array).subarray(r.spec.offset, r.spec.offset + r.length);
}

function roundUp(n: number): number {
  return Math.ceil(n / PAGE_SIZE) * PAGE_SIZE;
}

function fromBuffer(id: number, name: string | undefined, buffer: Uint8Array): ImageRegion {
  if (!(buffer instanceof Uint8Array) || buffer.length === 0 || buffer.length % PAGE_SIZE !== 0) {
    throw new PostcopyError(ErrorCode.IMAGE_INVALID, `region ${id}: a buffer image must be a non-empty multiple of ${PAGE_SIZE} bytes`);
  }
  return {
    id,
    name: name ?? `region${id}`,
    length: buffer.length,
    pageSize: PAGE_SIZE,
    contentLength: buffer.length,
    holes: 0,
    spec: { source: buffer, sourceIsMapping: false, offset: 0, length: buffer.length, pageSize: PAGE_SIZE },
  };
}

function fromFile(
  id: number,
  source: { name?: string; path: string } | { name?: string; fd: number },
  mappings: Mapping[],
  ownFds: number[],
  live: boolean,
): ImageRegion {
  const ownFd = 'path' in source;
  let fd: number;
  try {
    fd = ownFd ? openSync(source.path, 'r') : source.fd;
  } catch (err) {
    throw new PostcopyError(ErrorCode.IMAGE_INVALID, `region ${id} (${(source as { path: string }).path}): cannot open: ${(err as Error).message}`);
  }
  const what = `region ${id} (${'path' in source ? source.path : `fd ${source.fd}`})`;
  try {
    const stat = fstatSync(fd);
    if (stat.isDirectory()) throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${what}: is a directory, not an image file`);
    if (!stat.isFile())
      throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${what}: not a regular file or shared memory (a device, socket or pipe cannot be mapped as an image)`);
    const size = stat.size;
    if (size === 0) throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${what}: the image is empty`);
    const length = roundUp(size);
    // A read-only shared mapping: pages come straight from the page cache (or
    // the shared memory itself), never copied into this process.
    let mapping: Mapping;
    try {
      mapping = mapFile(fd, length, { readOnly: true, shared: true, allowPartialLastPage: true });
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      throw Object.assign(new PostcopyError(ErrorCode.IMAGE_INVALID, `${what}: cannot be mapped: ${e.message}`), { errno: e.errno, syscall: e.syscall });
    }
    mappings.push(mapping);
    const pages = length / PAGE_SIZE;
    const knownZero = new Uint8Array(Math.ceil(pages / 64) * 8);
    let holes = 0;
    for (const extent of live ? [] : fileExtents(fd, size)) {
      if (extent.data) continue;
      // Only whole pages inside the hole are zero for sure.
      const first = Math.ceil(extent.offset / PAGE_SIZE);
      const end = Math.floor((extent.offset + extent.length) / PAGE_SIZE) + (extent.offset + extent.length === size ? 1 : 0);
      for (let p = first; p < Math.min(end, pages); p++) {
        knownZero[p >> 3] |= 1 << (p & 7);
        holes++;
      }
    }
    const name = source.name ?? ('path' in source ? source.path : `fd${source.fd}`);
    // Shared memory of whole pages can be handed to a destination on this host as it is.
    const type = statfsSync(`/proc/self/fd/${fd}`).type;
    const shared = !live && (type === TMPFS_MAGIC || type === HUGETLBFS_MAGIC) && size === length;
    let memoryFd: number | undefined;
    if (shared && 'path' in source) {
      // Opened for writing too: a destination that takes it in place owns the memory from then on.
      try {
        memoryFd = openSync(source.path, 'r+');
        ownFds.push(memoryFd);
      } catch {
        memoryFd = undefined; // not ours to write: copied as usual
      }
    } else if (shared && 'fd' in source) {
      memoryFd = source.fd;
    }
    return {
      ...(memoryFd !== undefined ? { memoryFd } : {}),
      id,
      name,
      length,
      pageSize: PAGE_SIZE,
      contentLength: size,
      holes,
      spec: { source: mapping.handle, sourceIsMapping: true, offset: 0, length, pageSize: PAGE_SIZE, ...(live ? {} : { knownZero }) },
    };
  } finally {
    if (ownFd) closeSync(fd);
  }
}
