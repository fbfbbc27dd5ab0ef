// Access patterns for the benchmark workload: which page each touch hits.
import { shuffledOrder } from '../lib/workload.js';

export const PATTERNS = ['random', 'sequential', 'hotset', 'strided'] as const;
export type Pattern = (typeof PATTERNS)[number];

/** A small seeded PRNG (mulberry32) so every run of a pattern is the same. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * `pages` touches over a region of `pages` pages:
 * random: every page once, the floor's shuffled order; sequential: 0, 1, 2, ...;
 * hotset: 90% of touches on a scattered 10% of the pages, the rest anywhere;
 * strided: every 16th page, then the next offset (0, 16, 32, ..., 1, 17, ...).
 */
export function touchSequence(pattern: Pattern, pages: number, seed = 1): Uint32Array {
  switch (pattern) {
    case 'random':
      return shuffledOrder(pages, seed);
    case 'sequential':
      return Uint32Array.from({ length: pages }, (_, i) => i);
    case 'strided': {
      const out = new Uint32Array(pages);
      let k = 0;
      for (let offset = 0; offset < 16; offset++) for (let p = offset; p < pages; p += 16) out[k++] = p;
      return out;
    }
    case 'hotset': {
      const scattered = shuffledOrder(pages, seed);
      const hot = scattered.subarray(0, Math.max(1, Math.floor(pages / 10)));
      const rand = prng(seed);
      return Uint32Array.from({ length: pages }, () => (rand() < 0.9 ? hot[Math.floor(rand() * hot.length)] : Math.floor(rand() * pages)));
    }
  }
}

/** Deals a touch sequence round-robin to `threads` threads. */
export function splitForThreads(sequence: Uint32Array, threads: number): Uint32Array[] {
  return Array.from({ length: threads }, (_, t) =>
    Uint32Array.from({ length: Math.ceil((sequence.length - t) / threads) }, (_, i) => sequence[t + i * threads]),
  );
}
