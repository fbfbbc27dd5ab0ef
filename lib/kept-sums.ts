// The sums of an image file, kept beside it: `<image>.postcopy-sums`, a small
// JSON file holding the region's SHA-256 (and, once taken, its whole
// installed-pages checksum), keyed by the file's device, inode, size and
// modification time. A later `serve` of the same, unchanged file reads them
// instead of reading every page again; a file changed since (any of the four
// differs) is digested afresh. Writing it is best effort: a directory we may
// not write only costs the digest on every start.
import { readFileSync, renameSync, statSync, writeFileSync, type BigIntStats } from 'node:fs';

/** What identifies a file's content without reading it. */
export interface FileKey {
  dev: string;
  ino: string;
  size: number;
  mtimeNs: string;
}

export interface KeptSums {
  sha256?: string;
  /** The whole region's installed-pages checksum, 16 hex digits. */
  checksum?: string;
}

export const keptSumsPath = (path: string) => `${path}.postcopy-sums`;

/** The file's key now, or null when it cannot be read. */
export function fileKey(path: string): FileKey | null {
  try {
    return keyOf(statSync(path, { bigint: true }));
  } catch {
    return null;
  }
}

export function keyOf(s: BigIntStats): FileKey {
  return { dev: String(s.dev), ino: String(s.ino), size: Number(s.size), mtimeNs: String(s.mtimeNs) };
}

export const sameKey = (a: FileKey | null, b: FileKey | null): boolean =>
  a !== null && b !== null && a.dev === b.dev && a.ino === b.ino && a.size === b.size && a.mtimeNs === b.mtimeNs;

/** The sums kept for the file as it is now (its key matches), else {}. */
export function readKeptSums(path: string): KeptSums {
  try {
    const kept = JSON.parse(readFileSync(keptSumsPath(path), 'utf8')) as { key?: FileKey } & KeptSums;
    if (!sameKey(kept.key ?? null, fileKey(path))) return {};
    return {
      ...(typeof kept.sha256 === 'string' && /^[0-9a-f]{64}$/.test(kept.sha256) ? { sha256: kept.sha256 } : {}),
      ...(typeof kept.checksum === 'string' && /^[0-9a-f]{16}$/.test(kept.checksum) ? { checksum: kept.checksum } : {}),
    };
  } catch {
    return {};
  }
}

/**
 * Keeps `sums` (added to those already kept) for the file as it was at `key`,
 * taken before the sums were computed: unless the file still has that key,
 * nothing is written (it changed meanwhile).
 */
export function writeKeptSums(path: string, key: FileKey | null, sums: KeptSums): void {
  if (!sameKey(key, fileKey(path))) return;
  const kept = { format: 1, key, ...readKeptSums(path), ...sums };
  const tmp = `${keptSumsPath(path)}.${process.pid}.tmp`;
  try {
    writeFileSync(tmp, JSON.stringify(kept) + '\n', { mode: 0o600 });
    renameSync(tmp, keptSumsPath(path));
  } catch {
    // best effort: a read-only directory digests again next time
  }
}
