// What both ends compute over an image: the completion digest (SHA-256 of a
// whole region) and the image fingerprint a resuming destination checks before
// it takes a single page from a source.
import { createHash } from 'node:crypto';
import { setImmediate as yieldToLoop } from 'node:timers/promises';

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
