// The handshake a process sends when it hands its memory over (Firecracker's
// format): a JSON array of regions, with its userfaultfd (and, for memory
// that is a shared memory file, that file) attached. VMMs send it to the
// handler (docs/VMM-HANDSHAKE.md); a live workload sends it to its source.
import { readlinkSync } from 'node:fs';
import { ErrorCode, PostcopyError } from './errors.js';

/** One entry of the VMM's handshake, as Firecracker sends it. */
export interface GuestRegion {
  base_host_virt_addr: number;
  size: number;
  offset: number;
  page_size?: number;
  /** Deprecated alias of page_size; despite its name it holds bytes. */
  page_size_kib?: number;
  /**
   * MINOR mode: the region maps, shared, the memory file sent as the
   * handshake's second fd from this offset, and is registered for MINOR (and
   * MISSING) faults. Pages go into that file's page cache and the guest's
   * faults are answered with UFFDIO_CONTINUE (docs/VMM-HANDSHAKE.md).
   */
  memfd_offset?: number;
}

/** The fd is a userfaultfd. */
export function isUserfaultfd(fd: number): boolean {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[userfaultfd]';
  } catch {
    return false;
  }
}

const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

/** Parses and checks the shape of a handshake's JSON. */
export function parseHandshake(payload: Buffer): GuestRegion[] {
  let parsed: unknown;
  try {
    parsed = JSON.parse(payload.toString('utf8'));
  } catch {
    throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the handshake is not JSON');
  }
  if (!Array.isArray(parsed) || parsed.length === 0)
    throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the handshake must be a non-empty JSON array of regions');
  return parsed.map((r, i) => {
    if (!r || typeof r !== 'object') throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `region ${i} is not an object`);
    const { base_host_virt_addr: base, size, offset, page_size, page_size_kib, memfd_offset } = r as Record<string, unknown>;
    if (!isInt(base) || !isInt(size) || size === 0 || !isInt(offset)) {
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `region ${i} needs integer base_host_virt_addr, size (> 0) and offset`);
    }
    for (const [name, v] of [
      ['page_size', page_size],
      ['page_size_kib', page_size_kib],
    ] as const) {
      if (v !== undefined && (!isInt(v) || v < 4096 || (v & (v - 1)) !== 0))
        throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `region ${i}: ${name} must be a power of two >= 4096`);
    }
    if (memfd_offset !== undefined && !isInt(memfd_offset))
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, `region ${i}: memfd_offset must be a non-negative integer`);
    return {
      base_host_virt_addr: base,
      size,
      offset,
      page_size: (page_size ?? page_size_kib ?? 4096) as number,
      ...(memfd_offset !== undefined ? { memfd_offset: memfd_offset as number } : {}),
    };
  });
}
