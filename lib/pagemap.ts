// Which pages of another process's memory are present, from /proc/PID/pagemap
// (one little-endian u64 per page: bit 63 present, bit 62 swapped). A handler
// that takes over a VMM's memory uses it to find what is already resident.
import { closeSync, openSync, readSync } from 'node:fs';
import { PAGE_SIZE } from './memory.js';
import { validateAligned, validateInteger } from './validate.js';

const PRESENT = 1n << 63n;
const SWAPPED = 1n << 62n;

/**
 * One bit per `pageSize` page of [address, address+length) in process `pid`
 * (bit p of byte p/8): set when every base page of it is present or swapped.
 */
export function residentBitmap(pid: number, address: number, length: number, pageSize = PAGE_SIZE): Uint8Array {
  validateInteger(pid, 'pid', 1);
  validateAligned(address, 'address', pageSize);
  validateAligned(length, 'length', pageSize, pageSize);
  const pages = length / pageSize;
  const perPage = pageSize / PAGE_SIZE;
  const bitmap = new Uint8Array(Math.ceil(pages / 8));
  const fd = openSync(`/proc/${pid}/pagemap`, 'r');
  try {
    const chunkPages = 8192; // base pages read at a time: 64 KiB of entries
    const entries = Buffer.alloc(chunkPages * 8);
    const basePages = length / PAGE_SIZE;
    let allHeld = true; // for the current (possibly huge) page
    for (let first = 0; first < basePages; first += chunkPages) {
      const count = Math.min(chunkPages, basePages - first);
      const got = readSync(fd, entries, 0, count * 8, (address / PAGE_SIZE + first) * 8);
      for (let i = 0; i < count; i++) {
        const entry = i * 8 < got ? entries.readBigUInt64LE(i * 8) : 0n;
        const base = first + i;
        if (base % perPage === 0) allHeld = true;
        allHeld &&= (entry & (PRESENT | SWAPPED)) !== 0n;
        if (base % perPage === perPage - 1 && allHeld) {
          const p = (base + 1) / perPage - 1;
          bitmap[p >> 3] |= 1 << (p & 7);
        }
      }
    }
  } finally {
    closeSync(fd);
  }
  return bitmap;
}
