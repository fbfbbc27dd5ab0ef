// The benchmark's and tests' workload: one native thread touching pages of a
// region (never the JS thread, which must stay free to serve faults).
import { native, type TouchResult } from './native.js';
import { validateAligned, validateBoolean, validateInteger } from './validate.js';
import { outOfRange } from './errors.js';
import { PAGE_SIZE, Mapping } from './memory.js';

export type { TouchResult } from './native.js';

/** Page indices 0..pages-1 in the floor's seeded random order (glibc srand/rand). */
export function shuffledOrder(pages: number, seed = 1): Uint32Array {
  return native.shuffledOrder(validateInteger(pages, 'pages', 0, 0xffffffff), validateInteger(seed, 'seed', 0, 0xffffffff));
}

/**
 * Touches page `order[k]` of the region at `address` for each k, timing each
 * touch, on a native thread (pinned to `cpu` for the run when given). Pass the
 * region's `mapping` and it cannot be unmapped until the touches are done.
 */
export function touchPages(
  address: number,
  pageCount: number,
  order: Uint32Array,
  options: { write?: boolean; pageSize?: number; cpu?: number; mapping?: Mapping } = {},
): Promise<TouchResult> {
  const pageSize = validateAligned(options.pageSize ?? PAGE_SIZE, 'options.pageSize', PAGE_SIZE, PAGE_SIZE);
  validateAligned(address, 'address', pageSize, pageSize);
  validateInteger(pageCount, 'pageCount', 1);
  if (!(order instanceof Uint32Array)) throw outOfRange('order', 'a Uint32Array', order);
  for (const page of order) if (page >= pageCount) throw outOfRange('order[]', `< ${pageCount}`, page);
  const cpu = options.cpu === undefined ? -1 : validateInteger(options.cpu, 'options.cpu', 0, 1023);
  const mapping = options.mapping;
  if (mapping !== undefined) {
    if (!(mapping instanceof Mapping)) throw outOfRange('options.mapping', 'a Mapping', mapping);
    if (address < mapping.address || address + pageCount * pageSize > mapping.address + mapping.length)
      throw outOfRange('address', 'inside options.mapping', address);
  }
  return native.touchPages(address, pageSize, order, validateBoolean(options.write ?? false, 'options.write'), cpu, mapping?.handle);
}

/** What a cold start touches (coldStartOrder). */
export interface ColdStartShape {
  /** The share of pages in the stable working set (default 0.15). */
  workingSet?: number;
  /** Pages touched besides, different each run, as a share of all pages (default 0.001). */
  extra?: number;
  /** Chooses the working set: the same for every run of one "function" (default 1). */
  setSeed?: number;
}

/**
 * Page indices as a cold start touches them: a stable working set (clusters
 * of 1 to 32 pages chosen by `setSeed`: code and heap) touched in an order
 * that differs with each `runSeed`, plus a few random pages of that run only.
 */
export function coldStartOrder(pages: number, runSeed: number, shape: ColdStartShape = {}): Uint32Array {
  validateInteger(pages, 'pages', 1, 0xffffffff);
  validateInteger(runSeed, 'runSeed', 0, 0xffffffff);
  const share = shape.workingSet ?? 0.15;
  const extraShare = shape.extra ?? 0.001;
  if (!(share > 0 && share <= 1)) throw outOfRange('shape.workingSet', 'in (0, 1]', share);
  if (!(extraShare >= 0 && extraShare <= 1)) throw outOfRange('shape.extra', 'in [0, 1]', extraShare);
  const inSet = new Uint8Array(pages);
  const setRandom = seededRandom(validateInteger(shape.setSeed ?? 1, 'shape.setSeed', 0, 0xffffffff));
  const want = Math.max(1, Math.round(pages * share));
  let chosen = 0;
  while (chosen < want) {
    const start = Math.floor(setRandom() * pages);
    const length = 1 + Math.floor(setRandom() * 32);
    for (let p = start; p < Math.min(pages, start + length) && chosen < want; p++) if (!inSet[p]) ((inSet[p] = 1), chosen++);
  }
  const run = seededRandom(runSeed ^ 0x9e3779b9);
  const order: number[] = [];
  for (let p = 0; p < pages; p++) if (inSet[p]) order.push(p);
  for (let k = Math.round(pages * extraShare); k > 0; k--) {
    const p = Math.floor(run() * pages);
    if (!inSet[p]) ((inSet[p] = 2), order.push(p));
  }
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(run() * (i + 1));
    [order[i], order[j]] = [order[j], order[i]];
  }
  return Uint32Array.from(order);
}

/** A small seeded generator (mulberry32): the same seed, the same numbers in [0, 1). */
function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
