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
