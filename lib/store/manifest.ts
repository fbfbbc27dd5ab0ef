// An image in a store: its manifest names, for each region, the chunks that
// make it up in order ('' for a chunk of zeros, never stored). The layout is
// docs/STORE.md's; a manifest read from a store is checked field by field
// before anything uses it.
import { ErrorCode, PostcopyError } from '../errors.js';
import { checkImageName } from './address.js';

export const MANIFEST_FORMAT = 'uffd-postcopy image';
export const MANIFEST_VERSION = 1;

export interface ManifestRegion {
  id: number;
  name: string;
  /** Bytes, a whole number of pages. */
  length: number;
  pageSize: number;
  /** Bytes of content before the zero padding to whole pages. */
  contentLength: number;
  /** SHA-256 of the region's whole length. */
  sha256: string;
  /** Bytes per chunk (the last one may be shorter): a whole number of pages. */
  chunkBytes: number;
  /** Each chunk's SHA-256 (its object's name), '' for zeros. */
  chunks: string[];
}

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: typeof MANIFEST_VERSION;
  name: string;
  /** The image this one was derived from (its chunks are shared), if any. */
  parent: string | null;
  created: string;
  /** The image's sampled fingerprint and full content digest (lib/image.ts). */
  fingerprint: string;
  content: string;
  regions: ManifestRegion[];
  /** Small files kept with the image (a QEMU snapshot's device state and its own manifest), each one chunk. */
  files?: ManifestFile[];
}

export interface ManifestFile {
  /** A plain file name (no directories). */
  name: string;
  length: number;
  /** Its content's SHA-256 (its chunk's name); '' for an empty file. */
  chunk: string;
}

export function manifestKey(name: string): string {
  return `images/${name}.json`;
}

/** A push under way names its chunks here first, so that gc keeps them (docs/STORE.md). */
export function pendingKey(name: string, id: string): string {
  return `pending/${name}.${id}.json`;
}

export function totalBytes(m: Manifest): number {
  return m.regions.reduce((n, r) => n + r.length, 0);
}

/** Distinct chunks a manifest names (zeros are none). */
export function chunksOf(m: Manifest): Set<string> {
  const set = new Set<string>();
  for (const r of m.regions) for (const c of r.chunks) if (c) set.add(c);
  for (const f of m.files ?? []) if (f.chunk) set.add(f.chunk);
  return set;
}

const HEX64 = /^[0-9a-f]{64}$/;

/** A manifest's bytes, checked: ERR_STORE_CORRUPT naming what is wrong. */
export function parseManifest(bytes: Uint8Array, where: string): Manifest {
  const bad = (why: string) => new PostcopyError(ErrorCode.STORE_CORRUPT, `${where}: not a usable image manifest: ${why}`);
  let m: Manifest;
  try {
    m = JSON.parse(Buffer.from(bytes).toString('utf8')) as Manifest;
  } catch {
    throw bad('not JSON');
  }
  if (typeof m !== 'object' || m === null || m.format !== MANIFEST_FORMAT) throw bad('no "format"');
  if (m.version !== MANIFEST_VERSION) throw bad(`version ${String(m.version)}, this build reads ${MANIFEST_VERSION}`);
  try {
    checkImageName(m.name);
    if (m.parent !== null) checkImageName(m.parent);
  } catch {
    throw bad('a bad name');
  }
  if (typeof m.fingerprint !== 'string' || typeof m.content !== 'string') throw bad('no fingerprint or content digest');
  if (!Array.isArray(m.regions) || m.regions.length === 0 || m.regions.length > 1024) throw bad('no regions');
  m.regions.forEach((r, i) => {
    const whole = (n: unknown) => Number.isSafeInteger(n) && (n as number) > 0;
    if (r.id !== i) throw bad(`region ${i}: id ${String(r.id)}`);
    if (typeof r.name !== 'string' || r.name.length > 4096) throw bad(`region ${i}: name`);
    if (!whole(r.pageSize) || (r.pageSize & (r.pageSize - 1)) !== 0 || r.pageSize < 4096) throw bad(`region ${i}: page size`);
    if (!whole(r.length) || r.length % r.pageSize !== 0) throw bad(`region ${i}: length`);
    if (!Number.isSafeInteger(r.contentLength) || r.contentLength < 0 || r.contentLength > r.length) throw bad(`region ${i}: content length`);
    if (!whole(r.chunkBytes) || r.chunkBytes % r.pageSize !== 0 || (r.chunkBytes & (r.chunkBytes - 1)) !== 0 || r.chunkBytes > 1 << 30)
      throw bad(`region ${i}: chunk size`);
    if (typeof r.sha256 !== 'string' || !HEX64.test(r.sha256)) throw bad(`region ${i}: digest`);
    if (!Array.isArray(r.chunks) || r.chunks.length !== Math.ceil(r.length / r.chunkBytes)) throw bad(`region ${i}: chunk count`);
    for (const c of r.chunks) if (c !== '' && (typeof c !== 'string' || !HEX64.test(c))) throw bad(`region ${i}: a chunk name`);
  });
  if (m.files !== undefined) {
    if (!Array.isArray(m.files) || m.files.length > 64) throw bad('files');
    for (const f of m.files) {
      if (typeof f.name !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(f.name)) throw bad('a file name');
      if (!Number.isSafeInteger(f.length) || f.length < 0 || f.length > 16 << 20) throw bad(`file ${f.name}: length`);
      if (typeof f.chunk !== 'string' || (f.chunk !== '' && !HEX64.test(f.chunk)) || (f.chunk === '') !== (f.length === 0)) throw bad(`file ${f.name}: chunk`);
    }
  }
  return m;
}
