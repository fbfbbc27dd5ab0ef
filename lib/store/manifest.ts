// An image in a store: its manifest names, for each region, the chunks that
// make it up in order ('' for a chunk of zeros, never stored), and where each
// lies: a byte range of a pack (version 2), or, for chunks pushed before packs
// (version 1, or a place of null), an object of its own. The layout is
// docs/STORE.md's; a manifest read from a store is checked field by field
// before anything uses it.
import { ErrorCode, PostcopyError } from '../errors.js';
import { checkImageName } from './address.js';

export const MANIFEST_FORMAT = 'uffd-postcopy image';
export const MANIFEST_VERSION = 2;
/** Versions this build reads: 1 (every chunk an object of its own) and 2 (chunks in packs). */
const READS_VERSIONS = [1, 2];

/** A chunk in a pack: [index into the manifest's packs, byte offset of its object there, the object's length]. */
export type Place = [number, number, number];

/** A chunk's object as a byte range of a pack. */
export interface ChunkPlace {
  pack: string;
  offset: number;
  length: number;
}

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
  /** Version 2: where each chunk's object lies (null: an object of its own, or zeros). */
  places?: (Place | null)[];
}

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: number;
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
  /** Version 2: the packs its places name (each the SHA-256 of the pack's bytes). */
  packs?: string[];
}

export interface ManifestFile {
  /** A plain file name (no directories). */
  name: string;
  length: number;
  /** Its content's SHA-256 (its chunk's name); '' for an empty file. */
  chunk: string;
  /** Version 2: where its chunk's object lies (null: an object of its own). */
  place?: Place | null;
}

export function manifestKey(name: string): string {
  return `images/${name}.json`;
}

/** A push under way names its chunks here first, so that gc keeps them (docs/STORE.md). */
export function pendingKey(name: string, id: string): string {
  return `pending/${name}.${id}.json`;
}

/** The object name of a pack (spread over 256 folders, as chunks are). */
export function packKey(name: string): string {
  return `packs/${name.slice(0, 2)}/${name}`;
}

/** Where each chunk of the manifest lies, by its hash: those in packs (any other is an object of its own). */
export function placesOf(m: Manifest): Map<string, ChunkPlace> {
  const out = new Map<string, ChunkPlace>();
  const packs = m.packs ?? [];
  const add = (hash: string, p: Place | null | undefined) => {
    if (hash && p && !out.has(hash)) out.set(hash, { pack: packs[p[0]], offset: p[1], length: p[2] });
  };
  for (const r of m.regions) r.chunks.forEach((c, i) => add(c, r.places?.[i]));
  for (const f of m.files ?? []) add(f.chunk, f.place);
  return out;
}

/** `next` lies right after `prev` in one pack: a GET of `prev`'s range can go on through `next`'s. */
export function liesAfter(prev: ChunkPlace, next: ChunkPlace): boolean {
  return next.pack === prev.pack && next.offset === prev.offset + prev.length;
}

/** The packs a manifest's places name. */
export function packsOf(m: Manifest): Set<string> {
  return new Set(m.packs ?? []);
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
/** A chunk's object is at most its content (16 MiB), a header, and what compression or sealing may add. */
const MAX_PLACE_BYTES = 32 << 20;

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
  if (!READS_VERSIONS.includes(m.version)) throw bad(`version ${String(m.version)}, this build reads ${READS_VERSIONS.join(' and ')}`);
  const packs = m.version >= 2 ? m.packs : undefined;
  if (m.version >= 2 && (!Array.isArray(packs) || packs.length > 1 << 24 || !packs.every((p) => typeof p === 'string' && HEX64.test(p)))) throw bad('packs');
  /** A place: null, or a byte range of one of the packs (null where the chunk is zeros or there are no packs). */
  const checkPlace = (p: unknown, chunk: string, where: string) => {
    if (p === null || p === undefined) return;
    if (!packs || !chunk) throw bad(`${where}: a place where there can be none`);
    const ok =
      Array.isArray(p) &&
      p.length === 3 &&
      Number.isSafeInteger(p[0]) &&
      p[0] >= 0 &&
      p[0] < packs.length &&
      Number.isSafeInteger(p[1]) &&
      p[1] >= 0 &&
      Number.isSafeInteger(p[2]) &&
      p[2] > 0 &&
      p[2] <= MAX_PLACE_BYTES;
    if (!ok) throw bad(`${where}: a place`);
  };
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
    if (r.places !== undefined) {
      if (!packs || !Array.isArray(r.places) || r.places.length !== r.chunks.length) throw bad(`region ${i}: places`);
      r.places.forEach((p, k) => checkPlace(p, r.chunks[k], `region ${i}, chunk ${k}`));
    }
  });
  if (m.files !== undefined) {
    if (!Array.isArray(m.files) || m.files.length > 64) throw bad('files');
    for (const f of m.files) {
      if (typeof f.name !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(f.name)) throw bad('a file name');
      if (!Number.isSafeInteger(f.length) || f.length < 0 || f.length > 16 << 20) throw bad(`file ${f.name}: length`);
      if (typeof f.chunk !== 'string' || (f.chunk !== '' && !HEX64.test(f.chunk)) || (f.chunk === '') !== (f.length === 0)) throw bad(`file ${f.name}: chunk`);
      checkPlace(f.place, f.chunk, `file ${f.name}`);
    }
  }
  return m;
}
