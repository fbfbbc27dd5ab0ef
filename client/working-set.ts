// Working sets (docs/WORKING-SET.md): the pages a workload faulted on while
// they were missing, in first-touch order, recorded by one restore
// (--record-working-set) and replayed by the next (--prefetch), which installs
// them before the workload asks.
//
// An entry is a u64, little-endian: source region << 48 | page. The same
// entries travel in `prefetch` messages to a remote source.
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync, renameSync } from 'node:fs';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { forEachEntry } from '../lib/protocol.js';
import type { Logger } from '../lib/logger.js';

const MAGIC = 'uffd-postcopy working set 1\n';
const HASH_BYTES = 32;

export interface WorkingSetLayout {
  regions: { pages: number; pageSize: number }[];
}

export interface WorkingSet extends WorkingSetLayout {
  /** The image it was recorded against (lib/digest.ts imageFingerprint). */
  fingerprint: string;
  /** The entries, in first-touch order. */
  entries: Uint8Array;
}

/** How many pages a set holds. */
export function pagesIn(set: { entries: Uint8Array }): number {
  return set.entries.length / 8;
}

/** Writes the set (to a temporary name first, so a reader never sees half of it). */
export function writeWorkingSet(path: string, set: WorkingSet): void {
  const header = Buffer.from(
    JSON.stringify({ regions: set.regions.map(({ pages, pageSize }) => ({ pages, pageSize })), fingerprint: set.fingerprint, pages: pagesIn(set) }) + '\n',
  );
  const body = Buffer.concat([Buffer.from(MAGIC), header, set.entries]);
  const hash = createHash('sha256').update(body).digest();
  const temporary = `${path}.${process.pid}.tmp`;
  writeFileSync(temporary, Buffer.concat([body, hash]), { mode: 0o600 });
  renameSync(temporary, path);
}

/** Reads a set and checks it whole: magic, header, entry count and checksum. Throws ERR_WORKING_SET_INVALID. */
export function readWorkingSet(path: string): WorkingSet {
  let bytes: Buffer;
  try {
    bytes = readFileSync(path);
  } catch (err) {
    throw new PostcopyError(ErrorCode.WORKING_SET_INVALID, `${path}: cannot read the working set: ${(err as Error).message}`);
  }
  const invalid = (why: string) => new PostcopyError(ErrorCode.WORKING_SET_INVALID, `${path}: ${why}`);
  if (bytes.length < MAGIC.length || bytes.subarray(0, MAGIC.length).toString() !== MAGIC) throw invalid('not a working-set file');
  if (bytes.length < MAGIC.length + HASH_BYTES) throw invalid('truncated');
  const body = bytes.subarray(0, bytes.length - HASH_BYTES);
  if (
    !createHash('sha256')
      .update(body)
      .digest()
      .equals(bytes.subarray(bytes.length - HASH_BYTES))
  )
    throw invalid('truncated or corrupt (its checksum does not match)');
  const end = body.indexOf(0x0a, MAGIC.length);
  if (end < 0) throw invalid('no header');
  let header: { regions?: unknown; fingerprint?: unknown; pages?: unknown };
  try {
    header = JSON.parse(body.subarray(MAGIC.length, end).toString());
  } catch {
    throw invalid('a header that is not JSON');
  }
  const regions = header.regions;
  const ok =
    Array.isArray(regions) &&
    regions.length > 0 &&
    regions.every((r) => Number.isSafeInteger(r?.pages) && r.pages > 0 && Number.isSafeInteger(r?.pageSize) && r.pageSize > 0) &&
    typeof header.fingerprint === 'string' &&
    Number.isSafeInteger(header.pages);
  if (!ok) throw invalid('a malformed header');
  const entries = new Uint8Array(body.subarray(end + 1));
  if (entries.length !== (header.pages as number) * 8) throw invalid(`the header says ${header.pages} pages, the file holds ${entries.length / 8}`);
  return { regions: regions as WorkingSet['regions'], fingerprint: header.fingerprint as string, entries };
}

/**
 * Checks that a set fits an image: the same regions, each the same size, and
 * every entry inside them. Throws ERR_WORKING_SET_MISMATCH: a set that no
 * longer fits is never applied.
 */
export function checkWorkingSetFits(set: WorkingSet, image: WorkingSetLayout, what = 'the working set'): void {
  const layout = (l: WorkingSetLayout) => l.regions.map((r) => `${r.pages}x${r.pageSize}`).join(', ');
  const same =
    set.regions.length === image.regions.length && set.regions.every((r, i) => r.pages === image.regions[i].pages && r.pageSize === image.regions[i].pageSize);
  if (!same)
    throw new PostcopyError(
      ErrorCode.WORKING_SET_MISMATCH,
      `${what} was recorded for regions [${layout(set)}] (pages x page size); this image has [${layout(image)}]`,
    );
  forEachEntry(set.entries, (region, page) => {
    if (page >= set.regions[region]?.pages || region >= set.regions.length)
      throw new PostcopyError(ErrorCode.WORKING_SET_MISMATCH, `${what} names page ${page} of region ${region}, outside the image`);
  });
}

/** The entries, in order, as `prefetch` messages carry them: at most `perMessage` entries each. */
export function entryChunks(entries: Uint8Array, perMessage: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let k = 0; k < entries.length; k += perMessage * 8) out.push(entries.subarray(k, k + perMessage * 8));
  return out;
}

/** The layout of an image's regions, as a working set records it. */
export function layoutOf(regions: readonly { length: number; pageSize: number }[]): WorkingSetLayout {
  return { regions: regions.map((r) => ({ pages: r.length / r.pageSize, pageSize: r.pageSize })) };
}

/**
 * Before a set is replayed: it must fit the image (else ERR_WORKING_SET_MISMATCH);
 * recorded against other contents of the same layout, it is replayed with a warning.
 */
export function checkReplay(set: WorkingSet, regions: readonly { length: number; pageSize: number }[], fingerprint: string, log: Logger): void {
  checkWorkingSetFits(set, layoutOf(regions));
  if (set.fingerprint !== fingerprint)
    log.warn(
      { recordedFor: set.fingerprint.slice(0, 16), image: fingerprint.slice(0, 16) },
      'the working set was recorded against other contents of the same layout; replaying it',
    );
  log.info({ pages: pagesIn(set) }, 'replaying a working set');
}
