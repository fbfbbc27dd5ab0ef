// A snapshot store: images as manifests and content-named chunks in an
// S3-compatible bucket (docs/STORE.md). push uploads only the chunks the
// store lacks; ls, rm and gc keep it; chunk() fetches one chunk, checked
// against its name (fetched again once when it is not: a damaged transfer),
// through the host's chunk cache when one is given.
import { randomBytes } from 'node:crypto';
import { basename } from 'node:path';
import { ErrorCode, PostcopyError, asCodedError } from '../errors.js';
import { silentLogger, type Logger } from '../logger.js';
import type { Image } from '../image.js';
import { checkImageName, formatStoreUrl, type StoreAddress } from './address.js';
import { DEFAULT_CHUNK_BYTES, checkChunkBytes, chunkHash, chunkKey, decodeChunk, encodeChunk, isZero } from './chunk.js';
import type { ChunkCache } from './chunk-cache.js';
import { isSealedManifest, type TenantKey } from './tenant.js';
import { MANIFEST_FORMAT, MANIFEST_VERSION, chunksOf, manifestKey, parseManifest, pendingKey, totalBytes, type Manifest } from './manifest.js';
import { ObjectStore, type ObjectStoreOptions } from './object-store.js';

/** A chunk younger than this is never collected, and a push trusts one it finds only when younger than half of it. */
export const DEFAULT_GC_GRACE_MS = 60 * 60 * 1000;
/** A push that left its pending record this long ago is over (it crashed). */
const PENDING_EXPIRES_MS = 24 * 60 * 60 * 1000;

export interface PushOptions {
  parent?: string;
  chunkBytes?: number;
  /** Replace an image of that name (default: refuse). */
  replace?: boolean;
  /** Uploads in flight (default 16). */
  parallel?: number;
  /** Small files kept with the image (each at most 16 MiB), e.g. a QEMU snapshot's device state. */
  files?: { name: string; bytes: Uint8Array }[];
  onProgress?: (p: { chunks: number; of: number; uploadedBytes: number }) => void;
}

export interface PushReport {
  name: string;
  parent: string | null;
  /** The image's bytes. */
  bytes: number;
  chunks: number;
  zeroChunks: number;
  /** Chunks named more than once within the image, stored once. */
  repeatedChunks: number;
  /** Chunks the store held already (from the parent, another image, an earlier push). */
  presentChunks: number;
  uploadedChunks: number;
  /** Bytes sent (compressed chunks and the manifest) and their share of the image's bytes. */
  uploadedBytes: number;
  uploadedRatio: number;
  tookMs: number;
}

export interface ImageEntry {
  name: string;
  parent: string | null;
  created: string;
  bytes: number;
  chunks: number;
}

export interface GcReport {
  images: number;
  chunks: number;
  kept: number;
  deleted: number;
  bytesFreed: number;
  /** Pending records of pushes that never finished, removed. */
  abandonedPushes: number;
}

export interface SnapshotStoreOptions extends ObjectStoreOptions {
  /** Seal chunks and manifests with this tenant's key (lib/store/tenant.ts): the store never sees plaintext. */
  tenant?: TenantKey;
}

export class SnapshotStore {
  readonly address: StoreAddress;
  readonly objects: ObjectStore;
  readonly #log: Logger;
  readonly #tenant: TenantKey | undefined;

  constructor(address: StoreAddress, options: SnapshotStoreOptions = {}) {
    this.address = address;
    this.#log = options.logger ?? silentLogger;
    this.#tenant = options.tenant;
    this.objects = new ObjectStore(address, options);
  }

  /** The object holding the chunk whose content hashes to `hash` (named by the tenant's key, when there is one). */
  #chunkObject(hash: string): string {
    return chunkKey(this.#tenant ? this.#tenant.objectName(hash) : hash);
  }

  #objectNameOf(hash: string): string {
    return this.#tenant ? this.#tenant.objectName(hash) : hash;
  }

  /** A manifest as stored: sealed with the tenant's key, when there is one. */
  #manifestBytes(m: Manifest): Buffer {
    const json = Buffer.from(JSON.stringify(m));
    return this.#tenant ? this.#tenant.sealManifest(json) : json;
  }

  #readManifest(bytes: Buffer, where: string): Manifest {
    if (this.#tenant) return parseManifest(this.#tenant.openManifest(bytes, where), where);
    if (isSealedManifest(bytes)) throw new PostcopyError(ErrorCode.STORE_DENIED, `${where}: sealed with a tenant's key: give the key (--tenant-key-file)`);
    return parseManifest(bytes, where);
  }

  get url(): string {
    return formatStoreUrl(this.address);
  }

  close(): void {
    this.objects.close();
  }

  async manifest(name: string): Promise<Manifest> {
    checkImageName(name);
    const bytes = await this.objects.get(manifestKey(name)).catch((err) => {
      const e = asCodedError(err);
      if (e.code === ErrorCode.STORE_NOT_FOUND && !/bucket/.test(e.message))
        throw new PostcopyError(ErrorCode.STORE_NOT_FOUND, `no image "${name}" in ${this.url}`, { image: name });
      throw e;
    });
    const m = this.#readManifest(bytes, formatStoreUrl(this.address, name));
    if (m.name !== name) throw new PostcopyError(ErrorCode.STORE_CORRUPT, `${formatStoreUrl(this.address, name)}: the manifest names "${m.name}"`);
    return m;
  }

  /**
   * One chunk's content. From `cache` when it holds it; else fetched, checked
   * against its name, and (fetched again once if damaged) kept in the cache.
   */
  async chunk(hash: string, cache?: ChunkCache): Promise<Buffer> {
    const fetch = async () => {
      try {
        return await decodeChunk(hash, await this.objects.get(this.#chunkObject(hash)), this.#tenant);
      } catch (err) {
        if (asCodedError(err).code !== ErrorCode.STORE_CORRUPT) throw err;
        this.#log.warn({ chunk: hash, err: (err as Error).message }, 'a chunk came damaged; fetching it again');
        return decodeChunk(hash, await this.objects.get(this.#chunkObject(hash)), this.#tenant);
      }
    };
    return cache ? cache.get(hash, fetch) : fetch();
  }

  /**
   * The whole image `name` in memory, one buffer per region, every chunk
   * checked (`parallel` fetches at a time, through `cache` when given).
   */
  async download(
    name: string,
    options: { cache?: ChunkCache; parallel?: number } = {},
  ): Promise<{ manifest: Manifest; regions: Buffer[]; files: { name: string; bytes: Buffer }[] }> {
    const manifest = await this.manifest(name);
    const regions = manifest.regions.map((r) => Buffer.alloc(r.length));
    const todo = manifest.regions.flatMap((r) => r.chunks.map((hash, i) => ({ region: r.id, at: i * r.chunkBytes, hash }))).filter((c) => c.hash);
    let next = 0;
    const worker = async () => {
      while (next < todo.length) {
        const c = todo[next++];
        const content = await this.chunk(c.hash, options.cache);
        const region = manifest.regions[c.region];
        if (content.length !== Math.min(region.chunkBytes, region.length - c.at))
          throw new PostcopyError(ErrorCode.STORE_CORRUPT, `chunk ${c.hash.slice(0, 16)} holds ${content.length} bytes, not what the manifest needs`);
        content.copy(regions[c.region], c.at);
      }
    };
    await Promise.all(Array.from({ length: Math.min(options.parallel ?? 16, Math.max(1, todo.length)) }, worker));
    return { manifest, regions, files: await this.files(manifest, options.cache) };
  }

  /** The small files kept with an image (manifest.files), each checked against its chunk's hash. */
  async files(manifest: Manifest, cache?: ChunkCache): Promise<{ name: string; bytes: Buffer }[]> {
    return Promise.all(
      (manifest.files ?? []).map(async (f) => {
        const bytes = f.chunk ? await this.chunk(f.chunk, cache) : Buffer.alloc(0);
        if (bytes.length !== f.length) throw new PostcopyError(ErrorCode.STORE_CORRUPT, `file ${f.name}: ${bytes.length} bytes, not ${f.length}`);
        return { name: f.name, bytes };
      }),
    );
  }

  /** Uploads `image` as `name`: the chunks the store lacks, then the manifest. */
  async push(image: Image, name: string, options: PushOptions = {}): Promise<PushReport> {
    const started = Date.now();
    checkImageName(name);
    const chunkBytes = checkChunkBytes(options.chunkBytes ?? DEFAULT_CHUNK_BYTES);
    if (!options.replace && (await this.objects.head(manifestKey(name))))
      throw new PostcopyError(ErrorCode.STORE_CONFLICT, `${formatStoreUrl(this.address, name)} exists already (--replace to overwrite it)`);
    const parent = options.parent ? await this.manifest(options.parent) : null;
    const known = parent ? chunksOf(parent) : new Set<string>();

    // Each region's chunks, named by their content (a region's pages never straddle two chunks).
    const regions: Manifest['regions'] = [];
    for (const r of image.regions) {
      const bytes = image.bytes(r.id);
      const size = Math.max(r.pageSize, chunkBytes); // both powers of two
      const chunks: string[] = [];
      for (let off = 0; off < r.length; off += size) {
        const piece = bytes.subarray(off, Math.min(r.length, off + size));
        chunks.push(isZero(piece) ? '' : chunkHash(piece));
      }
      regions.push({
        id: r.id,
        // A region opened from a file is named by its path here: the store keeps its base name only.
        name: r.path ? basename(r.path) : r.name,
        length: r.length,
        pageSize: r.pageSize,
        contentLength: r.contentLength,
        sha256: await image.digest(r.id),
        chunkBytes: size,
        chunks,
      });
    }
    const files = (options.files ?? []).map((f) => ({ name: f.name, length: f.bytes.length, chunk: f.bytes.length ? chunkHash(f.bytes) : '', bytes: f.bytes }));
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      version: MANIFEST_VERSION,
      name,
      parent: options.parent ?? null,
      created: new Date().toISOString(),
      fingerprint: image.fingerprint,
      content: (await image.contentDigest()) ?? '',
      regions,
      ...(files.length ? { files: files.map(({ name: n, length, chunk }) => ({ name: n, length, chunk })) } : {}),
    };
    parseManifest(Buffer.from(JSON.stringify(manifest)), name); // what is written can be read back

    const body = this.#manifestBytes(manifest);
    // Named first as pending, so that a gc running meanwhile keeps every chunk this push counts on.
    const pending = pendingKey(name, randomBytes(6).toString('hex'));
    await this.objects.put(pending, body, 'application/json');

    // The distinct chunks to make sure of: the first place each appears.
    const places = new Map<string, { region: number; offset: number; length: number } | { file: Uint8Array }>();
    let total = 0;
    let zero = 0;
    for (const r of regions)
      r.chunks.forEach((c, i) => {
        total++;
        if (!c) zero++;
        else if (!places.has(c)) places.set(c, { region: r.id, offset: i * r.chunkBytes, length: Math.min(r.chunkBytes, r.length - i * r.chunkBytes) });
      });
    for (const f of files) if (f.chunk && !places.has(f.chunk)) places.set(f.chunk, { file: f.bytes });
    const todo = [...places.entries()];
    let present = 0;
    let uploaded = 0;
    let uploadedBytes = 0;
    let done = 0;
    const graceMs = DEFAULT_GC_GRACE_MS;
    let next = 0;
    const worker = async () => {
      while (next < todo.length) {
        const [hash, at] = todo[next++];
        if (known.has(hash)) {
          present++;
        } else {
          // A chunk found is trusted while no gc may take it (young, or named by an image); an old orphan is written again.
          const found = await this.objects.head(this.#chunkObject(hash));
          if (found && Date.now() - found.lastModified.getTime() < graceMs / 2) {
            present++;
          } else {
            const object = await encodeChunk('file' in at ? at.file : image.bytes(at.region).subarray(at.offset, at.offset + at.length), this.#tenant, hash);
            await this.objects.put(this.#chunkObject(hash), object);
            uploaded++;
            uploadedBytes += object.length;
          }
        }
        done++;
        if (done % 64 === 0) options.onProgress?.({ chunks: done, of: todo.length, uploadedBytes });
      }
    };
    try {
      await Promise.all(Array.from({ length: Math.min(options.parallel ?? 16, Math.max(1, todo.length)) }, worker));
      await this.objects.put(manifestKey(name), body, 'application/json');
    } finally {
      await this.objects.delete([pending]).catch(() => {}); // gc removes a leftover once it expires
    }
    const bytes = totalBytes(manifest);
    const report: PushReport = {
      name,
      parent: manifest.parent,
      bytes,
      chunks: total,
      zeroChunks: zero,
      repeatedChunks: total - zero - places.size,
      presentChunks: present,
      uploadedChunks: uploaded,
      uploadedBytes: uploadedBytes + body.length,
      uploadedRatio: Math.round(((uploadedBytes + body.length) / bytes) * 1e4) / 1e4,
      tookMs: Date.now() - started,
    };
    this.#log.info({ store: this.url, ...report }, 'image pushed');
    return report;
  }

  async list(): Promise<ImageEntry[]> {
    const out: ImageEntry[] = [];
    for await (const o of this.objects.list('images/')) {
      const name = o.key.slice('images/'.length).replace(/\.json$/, '');
      const m = await this.manifest(name);
      out.push({ name, parent: m.parent, created: m.created, bytes: totalBytes(m), chunks: m.regions.reduce((n, r) => n + r.chunks.length, 0) });
    }
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Removes an image's manifest (its chunks go at the next gc); refused while another image names it as parent. */
  async remove(name: string, options: { force?: boolean } = {}): Promise<void> {
    await this.manifest(name); // ERR_STORE_NOT_FOUND when there is none
    if (!options.force) {
      const children = (await this.list()).filter((e) => e.parent === name).map((e) => e.name);
      if (children.length)
        throw new PostcopyError(ErrorCode.STORE_CONFLICT, `"${name}" is the parent of ${children.join(', ')}: remove those first (or --force)`);
    }
    await this.objects.delete([manifestKey(name)]);
    this.#log.info({ store: this.url, image: name }, 'image removed');
  }

  /**
   * Deletes the chunks no image (nor a push under way) names, once older
   * than `graceMs`. Safe beside concurrent pushes: a push names its chunks
   * (pending) before it counts on any, and trusts a chunk it finds only
   * while it is younger than half the grace.
   */
  async gc(options: { graceMs?: number } = {}): Promise<GcReport> {
    const graceMs = options.graceMs ?? DEFAULT_GC_GRACE_MS;
    const started = Date.now();
    const named = new Set<string>();
    let images = 0;
    let abandoned = 0;
    const readRoots = async () => {
      for await (const o of this.objects.list('images/')) {
        images++;
        for (const c of chunksOf(await this.manifest(o.key.slice('images/'.length).replace(/\.json$/, '')))) named.add(this.#objectNameOf(c));
      }
      for await (const o of this.objects.list('pending/')) {
        if (started - o.lastModified.getTime() > PENDING_EXPIRES_MS) {
          await this.objects.delete([o.key]);
          abandoned++;
          continue;
        }
        const bytes = await this.objects.get(o.key).catch(() => null); // finished (deleted) meanwhile
        if (bytes) for (const c of chunksOf(this.#readManifest(bytes, o.key))) named.add(this.#objectNameOf(c));
      }
    };
    await readRoots();
    const candidates: { key: string; size: number }[] = [];
    let chunks = 0;
    for await (const o of this.objects.list('chunks/')) {
      chunks++;
      const hash = o.key.slice(o.key.lastIndexOf('/') + 1);
      if (!named.has(hash) && started - o.lastModified.getTime() > graceMs) candidates.push({ key: o.key, size: o.size });
    }
    images = 0;
    await readRoots(); // images and pushes that began while the chunks were listed
    const doomed = candidates.filter((c) => !named.has(c.key.slice(c.key.lastIndexOf('/') + 1)));
    await this.objects.delete(doomed.map((c) => c.key));
    const report = {
      images,
      chunks,
      kept: chunks - doomed.length,
      deleted: doomed.length,
      bytesFreed: doomed.reduce((n, c) => n + c.size, 0),
      abandonedPushes: abandoned,
    };
    this.#log.info({ store: this.url, ...report }, 'store collected');
    return report;
  }
}
