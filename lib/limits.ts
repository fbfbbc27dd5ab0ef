// Limits shared by both ends; the native twins live in addon/wire.h.

import { totalmem } from 'node:os';

/** The largest page run on a data channel, in bytes (wire::kMaxRunBytes). */
export const MAX_RUN_BYTES = 2 << 20;

/** The most regions an image may have. */
export const MAX_REGIONS = 256;

/**
 * The largest image a destination accepts by default: twice this machine's
 * memory. Nothing larger could be restored here, and a source claiming more
 * must not make the destination allocate for it.
 */
export function defaultMaxImageBytes(): number {
  return 2 * totalmem();
}
