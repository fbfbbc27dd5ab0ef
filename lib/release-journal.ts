// What a release-as-sent source has freed of one region, kept beside the
// image file (`<image>.postcopy-released`) so that a restarted source knows:
// the region's digest and whole checksum as they were before anything was
// freed, which pages are gone (the destination holds them), each freed page's
// share of the installed-pages checksum, and the session they were freed
// for. Every entry is written before its hole is punched; a source killed at
// any point finds the journal telling at least what was freed.
//
// Layout (little-endian):
//   0   8  magic "PCREL1\0\0"
//   8   8  dev          16  8  inode       24  8  size (bytes of content)
//   32  8  the file's mtime (ns) after the last hole punched
//   40  4  page size    44  4  pending: 1 from a journal entry until its hole is punched (the mtime may then differ)
//   48  8  pages        56  8  pages freed
//   64 32  SHA-256 of the region before anything was freed
//   96  8  its whole installed-pages checksum
//  104 32  the session the pages were freed for (hex, zero-padded)
//  256     bitmap of freed pages (one bit per page), padded to 8 bytes
//  then    one u64 per page: a freed page's share of the checksum
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import type { FileKey } from './kept-sums.js';

const MAGIC = Buffer.from('PCREL1\0\0', 'latin1');
const HEADER_BYTES = 256;

export const releaseJournalPath = (path: string) => `${path}.postcopy-released`;

export interface RegionSums {
  pages: number;
  pageSize: number;
  sha256: string;
  checksum: bigint;
}

export class ReleaseJournal {
  /** One bit per page: freed. */
  readonly released: Uint8Array;
  /** Per freed page, its share of the installed-pages checksum. */
  readonly sums: BigUint64Array;
  readonly sha256: string;
  readonly checksum: bigint;
  #count: number;
  #session: string;
  readonly #fd: number | null;
  readonly #pages: number;
  readonly #pageSize: number;
  readonly #key: FileKey | null;
  /** The file's mtime after the last hole punched (else the key's). */
  #mtimeNs: string | undefined;

  private constructor(
    fd: number | null,
    key: FileKey | null,
    sums: RegionSums,
    count: number,
    session: string,
    released?: Uint8Array,
    perPage?: BigUint64Array,
  ) {
    this.#fd = fd;
    this.#key = key;
    this.#pages = sums.pages;
    this.#pageSize = sums.pageSize;
    this.sha256 = sums.sha256;
    this.checksum = sums.checksum;
    this.#count = count;
    this.#session = session;
    this.released = released ?? new Uint8Array(bitmapBytes(sums.pages));
    this.sums = perPage ?? new BigUint64Array(sums.pages);
  }

  /** A new journal: in the file beside `path` (replacing any), or in memory only (path null: a memfd, a buffer). */
  static create(path: string | null, key: FileKey | null, sums: RegionSums): ReleaseJournal {
    const fd = path === null ? null : openSync(releaseJournalPath(path), 'w+', 0o600);
    const journal = new ReleaseJournal(fd, key, sums, 0, '');
    journal.#writeHeader(0);
    return journal;
  }

  /**
   * The journal beside `path` when it belongs to the file as it is now (same
   * device, inode and size, and the mtime it recorded, or a punch under way
   * when it was written); else null (none, or a file replaced since).
   */
  static load(path: string, key: FileKey, pageSize: number): ReleaseJournal | null {
    let fd: number;
    try {
      fd = openSync(releaseJournalPath(path), 'r+');
    } catch {
      return null;
    }
    try {
      const h = Buffer.alloc(HEADER_BYTES);
      if (readSync(fd, h, 0, HEADER_BYTES, 0) !== HEADER_BYTES || !h.subarray(0, 8).equals(MAGIC)) throw new Error('not a journal');
      const pages = Number(h.readBigUInt64LE(48));
      const pending = h.readUInt32LE(44) === 1;
      const belongs =
        String(h.readBigUInt64LE(8)) === key.dev &&
        String(h.readBigUInt64LE(16)) === key.ino &&
        Number(h.readBigUInt64LE(24)) === key.size &&
        h.readUInt32LE(40) === pageSize &&
        pages === Math.ceil(key.size / pageSize) &&
        (pending || String(h.readBigUInt64LE(32)) === key.mtimeNs);
      if (!belongs) throw new Error('another file');
      const released = new Uint8Array(bitmapBytes(pages));
      const perPage = new BigUint64Array(pages);
      const sumsAt = HEADER_BYTES + released.length;
      if (readSync(fd, released, 0, released.length, HEADER_BYTES) !== released.length) throw new Error('truncated');
      // The sums of pages never freed were never written (a hole): they read as zeros, or not at all at the end.
      readSync(fd, new Uint8Array(perPage.buffer), 0, perPage.byteLength, sumsAt);
      const session = h.subarray(104, 136).toString('latin1').replace(/\0+$/, '');
      const sums = { pages, pageSize, sha256: h.subarray(64, 96).toString('hex'), checksum: h.readBigUInt64LE(96) };
      return new ReleaseJournal(fd, key, sums, Number(h.readBigUInt64LE(56)), session, released, perPage);
    } catch {
      closeSync(fd);
      return null;
    }
  }

  /** Pages freed so far. */
  get count(): number {
    return this.#count;
  }

  /** The session the pages were freed for ('' before the first). */
  get session(): string {
    return this.#session;
  }

  set session(id: string) {
    this.#session = id;
    this.#writeHeader(0);
  }

  isReleased(page: number): boolean {
    return ((this.released[page >> 3] >> (page & 7)) & 1) === 1;
  }

  /** Pages [first, first + count) are about to be freed, with these shares of the checksum: written before the hole is punched. */
  record(first: number, shares: BigUint64Array): void {
    for (let k = 0; k < shares.length; k++) {
      const p = first + k;
      if (!this.isReleased(p)) this.#count++;
      this.released[p >> 3] |= 1 << (p & 7);
    }
    this.sums.set(shares, first);
    if (this.#fd === null) return;
    const lo = first >> 3;
    const hi = (first + shares.length - 1) >> 3;
    writeSync(this.#fd, new Uint8Array(this.sums.buffer, first * 8, shares.length * 8), 0, shares.length * 8, HEADER_BYTES + this.released.length + first * 8);
    writeSync(this.#fd, this.released, lo, hi - lo + 1, HEADER_BYTES + lo);
    this.#writeHeader(1);
  }

  /** The holes are punched: the file's mtime now (`key`) is the one a restart must find. */
  punched(key: FileKey | null): void {
    if (key) this.#mtimeNs = key.mtimeNs;
    this.#writeHeader(0);
  }

  close(): void {
    if (this.#fd !== null) closeSync(this.#fd);
  }

  #writeHeader(pending: 0 | 1): void {
    if (this.#fd === null) return;
    const h = Buffer.alloc(HEADER_BYTES);
    MAGIC.copy(h, 0);
    const key = this.#key;
    h.writeBigUInt64LE(BigInt(key?.dev ?? 0), 8);
    h.writeBigUInt64LE(BigInt(key?.ino ?? 0), 16);
    h.writeBigUInt64LE(BigInt(key?.size ?? 0), 24);
    h.writeBigUInt64LE(BigInt(this.#mtimeNs ?? key?.mtimeNs ?? 0), 32);
    h.writeUInt32LE(this.#pageSize, 40);
    h.writeUInt32LE(pending, 44);
    h.writeBigUInt64LE(BigInt(this.#pages), 48);
    h.writeBigUInt64LE(BigInt(this.#count), 56);
    Buffer.from(this.sha256, 'hex').copy(h, 64);
    h.writeBigUInt64LE(this.checksum, 96);
    h.write(this.#session.slice(0, 32), 104, 'latin1');
    writeSync(this.#fd, h, 0, HEADER_BYTES, 0);
  }
}

function bitmapBytes(pages: number): number {
  return Math.ceil(pages / 64) * 8;
}
