// What both ends compute over an image: the completion digest (SHA-256 of a
// whole region) and the image fingerprint a resuming destination checks before
// it takes a single page from a source.
import { createHash } from 'node:crypto';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
import { native } from './native.js';
import { validateInteger } from './validate.js';
import { ErrorCode, PostcopyError } from './errors.js';

/** SHA-256 in slices, yielding to the event loop between them so control traffic keeps flowing. */
export async function digestOf(bytes: Uint8Array): Promise<string> {
  const hash = createHash('sha256');
  const slice = 64 << 20;
  for (let off = 0; off < bytes.length; off += slice) {
    hash.update(bytes.subarray(off, Math.min(bytes.length, off + slice)));
    if (off + slice < bytes.length) await yieldToLoop();
  }
  return hash.digest('hex');
}

const SUM_MASK = (1n << 64n) - 1n;
/** Pages hashed per native call: a few milliseconds, then the event loop runs. */
const CHECKSUM_SLICE_PAGES = 8192;

/**
 * The installed-pages checksum (addon/page_checksum.h) of `ranges` ([first,
 * count] pairs) of a region whose page 0 is bytes[0]: the sum modulo 2^64 of
 * each page's contribution. Computed in slices, yielding between them.
 */
export async function pageChecksum(bytes: Uint8Array, pageSize: number, region: number, ranges: readonly (readonly [number, number])[]): Promise<bigint> {
  if (bytes.length === 0) throw new PostcopyError(ErrorCode.MAPPING_UNMAPPED, 'the image is closed');
  const pages = Math.floor(bytes.length / validateInteger(pageSize, 'pageSize', 32));
  validateInteger(region, 'region', 0, 0xffff);
  let sum = 0n;
  for (const [first, count] of ranges) {
    validateInteger(first, 'first', 0, pages);
    validateInteger(count, 'count', 0, pages - first);
    for (let at = first; at < first + count; at += CHECKSUM_SLICE_PAGES) {
      // The image may be closed while this yields (the server shutting down): say so, not "out of range".
      if (bytes.length === 0) throw new PostcopyError(ErrorCode.MAPPING_UNMAPPED, 'the image was closed while its checksum was being computed');
      sum += native.pageChecksum(bytes, pageSize, region, at, Math.min(CHECKSUM_SLICE_PAGES, first + count - at));
      if (at + CHECKSUM_SLICE_PAGES < first + count) await yieldToLoop();
    }
  }
  return sum & SUM_MASK;
}

/** A checksum as the wire carries it: 16 hex digits. */
export function checksumHex(sum: bigint): string {
  return (sum & SUM_MASK).toString(16).padStart(16, '0');
}

/** Pages sampled per region for the fingerprint: cheap at start-up whatever the image's size. */
export const FINGERPRINT_SAMPLES = 64;

/**
 * SHA-256 over each region's length and page size and the contents of
 * FINGERPRINT_SAMPLES pages spread evenly over it (always its first and last).
 * Two sources serving the same image agree; a different size, layout or
 * content almost always shows. It is a guard, not a proof: the completion
 * digest still compares every byte.
 */
export function imageFingerprint(regions: readonly { length: number; pageSize: number; bytes: Uint8Array }[]): string {
  const hash = createHash('sha256').update('uffd-postcopy image fingerprint\0');
  for (const r of regions) {
    const pages = r.length / r.pageSize;
    hash.update(`${r.length}:${r.pageSize};`);
    const samples = Math.min(pages, FINGERPRINT_SAMPLES);
    for (let k = 0; k < samples; k++) {
      const page = samples === 1 ? 0 : Math.round((k * (pages - 1)) / (samples - 1));
      hash.update(r.bytes.subarray(page * r.pageSize, (page + 1) * r.pageSize));
    }
  }
  return hash.digest('hex');
}
