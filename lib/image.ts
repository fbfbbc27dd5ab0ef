// What a source serves: one or more regions, each backed by a file (mapped
// read-only; holes found with SEEK_HOLE go out as zero runs without being
// read), a shared-memory file or memfd (the same, in place), or a Buffer.
// The image file format, with the files kept beside it (its sums,
// lib/kept-sums.ts; what release-as-sent freed of it, lib/release-journal.ts):
// in lib/ because both roles open images (a source serves one, a destination
// restores from a local one or a template).
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, fstatSync, openSync, statfsSync } from 'node:fs';
import { ErrorCode, PostcopyError } from './errors.js';
import { fileExtents, mapFile, PAGE_SIZE, punchHole, type Mapping } from './memory.js';
import type { RegionChecksum, RegionInfo } from './protocol.js';
import { native, type ServedRegionSpec } from './native.js';
import { checksumHex, digestOf, imageFingerprint, pageChecksum } from './digest.js';
import { fileKey, readKeptSums, writeKeptSums } from './kept-sums.js';
import { ReleaseJournal } from './release-journal.js';

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
  /** The file it was opened from by path: its sums are kept beside it (lib/kept-sums.ts). */
  path?: string;
}

const TMPFS_MAGIC = 0x01021994;
const HUGETLBFS_MAGIC = 0x958458f6;

/** A memory image: regions served read-only to any number of destinations. */
export class Image {
  readonly regions: ImageRegion[];
  /** A live image's name; for any other, the fingerprint once taken. */
  #fingerprint: string | null;
  readonly #mappings: Mapping[];
  readonly #ownFds: number[];
  readonly #digests = new Map<number, Promise<string>>();
  readonly #checksums = new Map<number, Promise<bigint>>();
  #kept = false;
  readonly #live: boolean;
  #content: Promise<string> | null = null;
  /** Release-as-sent: per region, what was freed (lib/release-journal.ts). */
  readonly #journals: (ReleaseJournal | undefined)[];

  private constructor(regions: ImageRegion[], mappings: Mapping[], ownFds: number[], live: string | null, journals: (ReleaseJournal | undefined)[]) {
    this.regions = regions;
    this.#mappings = mappings;
    this.#ownFds = ownFds;
    this.#live = live !== null;
    this.#journals = journals;
    // Sums kept beside a file (or in its release journal) are taken as computed.
    regions.forEach((r, id) => {
      const journal = journals[id];
      const kept = journal ? { sha256: journal.sha256, checksum: journal.checksum } : r.path && live === null ? keptSums(r.path) : {};
      if (kept.sha256) this.#digests.set(id, Promise.resolve(kept.sha256));
      if (kept.checksum !== undefined) this.#checksums.set(id, Promise.resolve(kept.checksum));
    });
    // A live image changes until its workload pauses: it is named afresh (or as its migration, once re-adopted), never by its contents.
    this.#fingerprint = live;
  }

  /**
   * Identifies the image to a destination that resumes (lib/digest.ts): taken
   * when first asked (it reads pages of every region: milliseconds that a
   * source which never names its image, a QEMU stream's, does not spend),
   * so from the pages as they are then; asked after close(), it throws
   * ERR_MAPPING_UNMAPPED.
   */
  get fingerprint(): string {
    return (this.#fingerprint ??= imageFingerprint(this.regions.map((r) => ({ length: r.length, pageSize: r.pageSize, bytes: regionBytes(r) }))));
  }

  /**
   * `live`: the memory of a running workload (server/live.ts), read as it
   * changes: no page is taken for zero from the file's holes, and it is never
   * offered in place. Its digests are taken when asked (once it is paused).
   * Its fingerprint names the migration: fresh, or `migration` for the memory
   * of a workload re-adopted while paused for that migration.
   *
   * `releaseAsSent`: the image may be one a release-as-sent source already
   * freed in part for its destination (its journal beside it says which
   * pages); without it, such an image is refused (ERR_IMAGE_CONSUMED): its
   * holes are not its content.
   */
  static open(sources: readonly RegionSource[], options: { live?: boolean; migration?: string; releaseAsSent?: boolean } = {}): Image {
    const live = options.live === true;
    if (!Array.isArray(sources) || sources.length === 0) throw new PostcopyError(ErrorCode.IMAGE_INVALID, 'an image needs at least one region');
    const regions: ImageRegion[] = [];
    const mappings: Mapping[] = [];
    const ownFds: number[] = [];
    const journals: (ReleaseJournal | undefined)[] = [];
    try {
      sources.forEach((source, id) => {
        const region = 'buffer' in source ? fromBuffer(id, source.name, source.buffer) : fromFile(id, source, mappings, ownFds, live);
        regions.push(region);
        const key = region.path && !live ? fileKey(region.path) : null;
        const journal = key ? (ReleaseJournal.load(region.path!, key, region.pageSize) ?? undefined) : undefined;
        journals.push(journal);
        if (journal && journal.count > 0 && options.releaseAsSent !== true)
          throw new PostcopyError(
            ErrorCode.IMAGE_CONSUMED,
            `${region.path}: ${journal.count} of its ${region.length / region.pageSize} pages were freed by serve --release-as-sent ` +
              `(their only copy is at the destination they were moved to): serve it with --release-as-sent for that destination to resume`,
          );
      });
    } catch (err) {
      for (const j of journals) j?.close();
      for (const m of mappings) m.unmap();
      for (const fd of ownFds) closeSync(fd);
      throw err;
    }
    return new Image(regions, mappings, ownFds, live ? (options.migration ?? `live-${randomBytes(16).toString('hex')}`) : null, journals);
  }

  get totalBytes(): number {
    return this.regions.reduce((sum, r) => sum + r.length, 0);
  }

  /** Region `id`'s bytes, its whole length (content plus zero padding), read in place. */
  bytes(id: number): Uint8Array {
    return regionBytes(this.regions[id]);
  }

  /** SHA-256 of a region's whole length (content plus zero padding), computed once (and kept beside its file). */
  digest(id: number): Promise<string> {
    let d = this.#digests.get(id);
    if (!d) {
      const r = this.regions[id];
      const key = r.path && !this.#live ? fileKey(r.path) : null;
      d = digestOf(regionBytes(r)).then((sha256) => {
        if (key) writeKeptSums(r.path!, key, { sha256 });
        return sha256;
      });
      this.#digests.set(id, d);
    }
    return d;
  }

  /**
   * The image's content digest: SHA-256 over its layout and every region's
   * SHA-256, so every byte of it. A destination that resumes on another
   * source takes pages from it only when this is the same (docs/PROTOCOL.md).
   * Computed once (a file's is kept beside it); null for a live image, whose
   * content changes until its workload pauses.
   */
  contentDigest(): Promise<string> | null {
    if (this.#live) return null;
    this.#content ??= Promise.all(this.regions.map((r) => this.digest(r.id))).then((digests) => {
      const hash = createHash('sha256').update('uffd-postcopy image content\0');
      this.regions.forEach((r, i) => hash.update(`${r.length}:${r.pageSize}:${digests[i]};`));
      return hash.digest('hex');
    });
    return this.#content;
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
    return checksumHex((await this.#wholeChecksum(id)) - (await this.#sumOf(id, skip)));
  }

  /** The checksum shares of pages `ranges` of region `id`: a freed page's from its journal, any other's from the image. */
  async #sumOf(id: number, ranges: readonly (readonly [number, number])[]): Promise<bigint> {
    const r = this.regions[id];
    const journal = this.#journals[id];
    if (!journal || journal.count === 0) return pageChecksum(regionBytes(r), r.pageSize, id, ranges);
    let sum = 0n;
    const present: [number, number][] = [];
    for (const [first, count] of ranges)
      for (let p = first; p < first + count; p++) {
        if (journal.isReleased(p)) sum += journal.sums[p];
        else if (present.length && present[present.length - 1][0] + present[present.length - 1][1] === p) present[present.length - 1][1]++;
        else present.push([p, 1]);
      }
    return sum + (await pageChecksum(regionBytes(r), r.pageSize, id, present));
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
      const key = r.path && !this.#live ? fileKey(r.path) : null;
      whole = pageChecksum(regionBytes(r), r.pageSize, id, [[0, r.length / r.pageSize]]).then((sum) => {
        if (key) writeKeptSums(r.path!, key, { checksum: checksumHex(sum) });
        return sum;
      });
      this.#checksums.set(id, whole);
    }
    return whole;
  }

  // ---- release as sent ----

  /**
   * Before the first page is freed: takes every sum (keepSums) and opens each
   * region's release journal (beside its file; in memory for a memfd), unless
   * one was found at open (a restarted source: it goes on).
   */
  async startReleasing(): Promise<void> {
    await this.keepSums();
    for (const r of this.regions) {
      if (this.#journals[r.id]) continue;
      const sums = { pages: r.length / r.pageSize, pageSize: r.pageSize, sha256: await this.digest(r.id), checksum: await this.#wholeChecksum(r.id) };
      this.#journals[r.id] = ReleaseJournal.create(r.path ?? null, r.path ? fileKey(r.path) : null, sums);
    }
  }

  /** Pages freed so far, over every region (release-as-sent). */
  get releasedPages(): number {
    return this.#journals.reduce((n, j) => n + (j?.count ?? 0), 0);
  }

  /** Per region, the bitmap of pages freed (all zeros where nothing was). */
  releasedBitmap(id: number): Uint8Array | null {
    return this.#journals[id]?.released ?? null;
  }

  /** The session the pages were freed for ('' when none yet). */
  get releasedFor(): string {
    return this.#journals.find((j) => j && j.session)?.session ?? '';
  }

  set releasedFor(session: string) {
    for (const j of this.#journals) if (j && j.session !== session) j.session = session;
  }

  /**
   * Frees the pages set in `bitmap` (bytes [offset, +length) of region
   * `region`'s bitmap) that are not freed yet: for each run, its pages'
   * checksum shares and bits go to the journal first, then the hole is
   * punched (fallocate). Returns how many pages were freed.
   */
  release(region: number, offset: number, bitmap: Uint8Array): number {
    const journal = this.#journals[region];
    const r = this.regions[region];
    if (!journal || r.memoryFd === undefined)
      throw new PostcopyError(ErrorCode.ENGINE_STATE, 'release before startReleasing(), or of an image not in shared memory');
    const done = journal.released;
    const bytes = regionBytes(r);
    let freed = 0;
    let run = -1;
    const flush = (end: number) => {
      if (run < 0) return;
      const shares = new BigUint64Array(end - run);
      native.pageChecksum(bytes, r.pageSize, region, run, end - run, shares);
      journal.record(run, shares);
      punchHole(r.memoryFd!, run * r.pageSize, (end - run) * r.pageSize);
      journal.punched(r.path ? fileKey(r.path) : null);
      freed += end - run;
      run = -1;
    };
    for (let i = 0; i < bitmap.length; i++) {
      const fresh = bitmap[i] & ~done[offset + i];
      if (fresh === 0 && run < 0) continue;
      for (let b = 0; b < 8; b++) {
        const page = (offset + i) * 8 + b;
        if ((fresh >> b) & 1 && page < r.length / r.pageSize) {
          if (run < 0) run = page;
        } else {
          flush(page);
        }
      }
    }
    flush((offset + bitmap.length) * 8);
    return freed;
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
    for (const j of this.#journals.splice(0)) j?.close();
    for (const m of this.#mappings) m.unmap();
    for (const fd of this.#ownFds.splice(0)) closeSync(fd);
  }
}

/** The pages of [0, pages) outside the ascending, disjoint ranges `skip`. */
/** The sums kept beside a file, as numbers. */
function keptSums(path: string): { sha256?: string; checksum?: bigint } {
  const kept = readKeptSums(path);
  return { ...(kept.sha256 ? { sha256: kept.sha256 } : {}), ...(kept.checksum ? { checksum: BigInt(`0x${kept.checksum}`) } : {}) };
}

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
      ...('path' in source ? { path: source.path } : {}),
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
