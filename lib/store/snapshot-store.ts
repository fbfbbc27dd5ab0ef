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
import {
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  chunksOf,
  liesAfter,
  manifestKey,
  packKey,
  packsOf,
  parseManifest,
  pendingKey,
  placesOf,
  totalBytes,
  type ChunkPlace,
  type Manifest,
  type Place,
} from './manifest.js';
import { ObjectStore, type ObjectStoreOptions } from './object-store.js';

/** A chunk younger than this is never collected, and a push trusts one it finds only when younger than half of it. */
export const DEFAULT_GC_GRACE_MS = 60 * 60 * 1000;
/**
 * A push writes the chunks the store lacks into packs of about this many
 * bytes: a restore fetches a run of neighbouring chunks with one ranged GET
 * (an object store's cost is per request: 1,024 GETs of 64 KiB chunks took
 * 1.6-6.7x one GET of the same bytes, docs/STORE.md), while a fault still
 * fetches its one chunk's range.
 */
const PACK_BYTES = 8 << 20;
const PACKS_IN_FLIGHT = 3;
/** A ranged GET of neighbouring chunks in a pack spans this many bytes at most. */
const RANGE_BYTES = 2 << 20;
/** A download asks for this many neighbouring chunks at a time. */
const CHUNKS_PER_FETCH = 16;

/** `p` lies right after the run's last chunk, in the same pack, and the run stays within RANGE_BYTES. */
function runFits(run: { place?: ChunkPlace | null }[], p: ChunkPlace): boolean {
  const first = run[0].place!;
  const last = run[run.length - 1].place!;
  return liesAfter(last, p) && p.offset + p.length - first.offset <= RANGE_BYTES;
}

/**
 * Neighbouring chunks of one pack, fetched together: the GET goes on the
 * loop's next turn, from the first chunk asked for by then to the last (those
 * the cache held are not asked for; one between two asked is fetched with
 * them), and each chunk is cut from it and checked.
 */
class RangeRun {
  readonly #get: (first: number, end: number, forChunk: string) => Promise<Buffer>;
  readonly #asked: { hash: string; place: ChunkPlace; resolve: (b: Buffer) => void; reject: (e: unknown) => void }[] = [];

  constructor(get: (first: number, end: number, forChunk: string) => Promise<Buffer>) {
    this.#get = get;
  }

  /** The chunk's object (its bytes as stored), from the run's one GET. */
  take(hash: string, place: ChunkPlace): Promise<Buffer> {
    return new Promise<Buffer>((resolve, reject) => {
      if (this.#asked.push({ hash, place, resolve, reject }) === 1) setImmediate(() => this.#fetch());
    });
  }

  async #fetch(): Promise<void> {
    const asked = this.#asked.splice(0);
    const first = Math.min(...asked.map((a) => a.place.offset));
    const end = Math.max(...asked.map((a) => a.place.offset + a.place.length));
    try {
      const bytes = await this.#get(first, end, asked[0].hash);
      for (const a of asked) a.resolve(bytes.subarray(a.place.offset - first, a.place.offset - first + a.place.length));
    } catch (err) {
      for (const a of asked) a.reject(err);
    }
  }
}

/** A chunk in a pack is marked by an empty object at its own name, whose metadata says where it lies: what a push's HEAD finds. */
function markerOf(place: ChunkPlace): Record<string, string> {
  return { pack: place.pack, at: `${place.offset}-${place.length}` };
}

/** Where a chunk a HEAD found lies: its pack's range (a marker), null (an object of its own), or undefined (neither: written again). */
function markedPlace(found: { size: number; metadata: Record<string, string> }): ChunkPlace | null | undefined {
  const pack = found.metadata.pack;
  if (pack === undefined) return found.size > 0 ? null : undefined;
  const m = /^(\d{1,15})-(\d{1,9})$/.exec(found.metadata.at ?? '');
  if (!/^[0-9a-f]{64}$/.test(pack) || !m || found.size !== 0) return undefined;
  return { pack, offset: Number(m[1]), length: Number(m[2]) };
}

/** A push that left its pending record this long ago is over (it crashed). */
const PENDING_EXPIRES_MS = 24 * 60 * 60 * 1000;

export interface PushOptions {
  parent?: string;
  chunkBytes?: number;
  /** Replace an image of that name (default: refuse). */
  replace?: boolean;
  /** Uploads in flight (default 16). */
  parallel?: number;
  /** The grace the store's gc runs with (default 1 h): a chunk found is trusted only while younger than half of it. */
  graceMs?: number;
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
  /** Chunk objects: each a marker of a chunk in a pack, or (pushed before packs) the chunk itself. */
  chunks: number;
  kept: number;
  deleted: number;
  packs: number;
  packsDeleted: number;
  /** Bytes of the packs kept that no image's chunk lies in (a pack one image still needs a chunk of is kept whole): what repacking would free. */
  packBytesUnneeded: number;
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
   * One chunk's content. From `cache` when it holds it; else fetched (its
   * pack's range, when `place` is given; else its own object), checked
   * against its name, and (fetched again once if damaged) kept in the cache.
   */
  async chunk(hash: string, cache?: ChunkCache, place?: ChunkPlace | null): Promise<Buffer> {
    const fetch = () => this.#fetchChecked(hash, place);
    return cache ? cache.get(hash, fetch) : fetch();
  }

  /**
   * A chunk's object fetched (by `first` when given: a run's GET) and
   * decoded; damaged, fetched once more on its own.
   */
  async #fetchChecked(hash: string, place: ChunkPlace | null | undefined, first?: () => Promise<Buffer>): Promise<Buffer> {
    const object = () => (place ? this.#fetchRange(place.pack, place.offset, place.length, hash) : this.objects.get(this.#chunkObject(hash)));
    try {
      return await decodeChunk(hash, await (first ?? object)(), this.#tenant);
    } catch (err) {
      if (asCodedError(err).code !== ErrorCode.STORE_CORRUPT) throw err;
      this.#log.warn({ chunk: hash, pack: place?.pack, err: (err as Error).message }, 'a chunk came damaged; fetching it again');
      return decodeChunk(hash, await object(), this.#tenant);
    }
  }

  /** Bytes [offset, offset + length) of a pack; a missing pack is ERR_STORE_NOT_FOUND naming the chunk wanted from it. */
  async #fetchRange(pack: string, offset: number, length: number, forChunk: string): Promise<Buffer> {
    const bytes = await this.objects.get(packKey(pack), [offset, offset + length - 1]).catch((err) => {
      const e = asCodedError(err);
      if (e.code === ErrorCode.STORE_NOT_FOUND && !/bucket/.test(e.message))
        throw new PostcopyError(ErrorCode.STORE_NOT_FOUND, `chunk ${forChunk.slice(0, 16)}: its pack ${pack.slice(0, 16)} is not in ${this.url}`, {
          chunk: forChunk,
          pack,
        });
      throw e;
    });
    if (bytes.length !== length)
      throw new PostcopyError(ErrorCode.STORE_CORRUPT, `pack ${pack.slice(0, 16)}: ${bytes.length} bytes at ${offset}, not ${length} (cut short)`, { pack });
    return bytes;
  }

  /**
   * Chunks' contents, in the order asked. Neighbours in one pack (each
   * starting where the one before ends) that the cache lacks are fetched
   * with one ranged GET, up to RANGE_BYTES; each is checked on its own.
   */
  async chunks(wanted: { hash: string; place?: ChunkPlace | null }[], cache?: ChunkCache): Promise<Buffer[]> {
    // Runs of neighbours first: a chunk alone (a fault's) is fetched at once, not on the loop's next turn.
    const runs: { hash: string; place?: ChunkPlace | null }[][] = [];
    for (const w of wanted) {
      const last = runs.at(-1)?.at(-1);
      if (w.place && last?.place && runFits(runs.at(-1)!, w.place)) runs.at(-1)!.push(w);
      else runs.push([w]);
    }
    return (
      await Promise.all(
        runs.map((members) => {
          if (members.length === 1) return Promise.all([this.chunk(members[0].hash, cache, members[0].place)]);
          const first = members[0].place!;
          const run = new RangeRun((from, end, hash) => this.#fetchRange(first.pack, from, end - from, hash));
          return Promise.all(
            members.map(({ hash, place }) => {
              // From the run's GET; damaged there, this chunk alone is fetched again.
              const fetch = () => this.#fetchChecked(hash, place, () => run.take(hash, place!));
              return cache ? cache.get(hash, fetch) : fetch();
            }),
          );
        }),
      )
    ).flat();
  }

  /**
   * The whole image `name` in memory, one buffer per region, every chunk
   * checked (`parallel` fetches at a time, neighbours in a pack together,
   * through `cache` when given).
   */
  async download(
    name: string,
    options: { cache?: ChunkCache; parallel?: number } = {},
  ): Promise<{ manifest: Manifest; regions: Buffer[]; files: { name: string; bytes: Buffer }[] }> {
    const manifest = await this.manifest(name);
    const places = placesOf(manifest);
    const regions = manifest.regions.map((r) => Buffer.alloc(r.length));
    const all = manifest.regions.flatMap((r) => r.chunks.map((hash, i) => ({ region: r.id, at: i * r.chunkBytes, hash }))).filter((c) => c.hash);
    const todo: (typeof all)[] = [];
    for (let i = 0; i < all.length; i += CHUNKS_PER_FETCH) todo.push(all.slice(i, i + CHUNKS_PER_FETCH));
    let next = 0;
    const worker = async () => {
      while (next < todo.length) {
        const group = todo[next++];
        const contents = await this.chunks(
          group.map((c) => ({ hash: c.hash, place: places.get(c.hash) })),
          options.cache,
        );
        group.forEach((c, k) => {
          const region = manifest.regions[c.region];
          if (contents[k].length !== Math.min(region.chunkBytes, region.length - c.at))
            throw new PostcopyError(ErrorCode.STORE_CORRUPT, `chunk ${c.hash.slice(0, 16)} holds ${contents[k].length} bytes, not what the manifest needs`);
          contents[k].copy(regions[c.region], c.at);
        });
      }
    };
    await Promise.all(Array.from({ length: Math.min(options.parallel ?? 16, Math.max(1, todo.length)) }, worker));
    return { manifest, regions, files: await this.files(manifest, options.cache) };
  }

  /** The small files kept with an image (manifest.files), each checked against its chunk's hash. */
  async files(manifest: Manifest, cache?: ChunkCache): Promise<{ name: string; bytes: Buffer }[]> {
    const places = placesOf(manifest);
    return Promise.all(
      (manifest.files ?? []).map(async (f) => {
        const bytes = f.chunk ? await this.chunk(f.chunk, cache, places.get(f.chunk)) : Buffer.alloc(0);
        if (bytes.length !== f.length) throw new PostcopyError(ErrorCode.STORE_CORRUPT, `file ${f.name}: ${bytes.length} bytes, not ${f.length}`);
        return { name: f.name, bytes };
      }),
    );
  }

  /** The object of a chunk of the image being pushed. */
  #encode(hash: string, at: { region: number; offset: number; length: number } | { file: Uint8Array }, image: Image): Promise<Buffer> {
    return encodeChunk('file' in at ? at.file : image.bytes(at.region).subarray(at.offset, at.offset + at.length), this.#tenant, hash);
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
      // Until the places are known, the packs a push may count on are its parent's: named in its pending record for gc.
      packs: parent ? [...packsOf(parent)] : [],
      ...(files.length ? { files: files.map(({ name: n, length, chunk }) => ({ name: n, length, chunk })) } : {}),
    };
    parseManifest(Buffer.from(JSON.stringify(manifest)), name); // what is written can be read back

    const body = this.#manifestBytes(manifest);
    let finalBody = body;
    const graceMs = options.graceMs ?? DEFAULT_GC_GRACE_MS;
    // Named first as pending, so that a gc running meanwhile keeps every chunk this push counts on.
    const pending = pendingKey(name, randomBytes(6).toString('hex'));
    await this.objects.put(pending, body, 'application/json');

    // The distinct chunks to make sure of: where each first appears in the image.
    const sources = new Map<string, { region: number; offset: number; length: number } | { file: Uint8Array }>();
    let total = 0;
    let zero = 0;
    for (const r of regions)
      r.chunks.forEach((c, i) => {
        total++;
        if (!c) zero++;
        else if (!sources.has(c)) sources.set(c, { region: r.id, offset: i * r.chunkBytes, length: Math.min(r.chunkBytes, r.length - i * r.chunkBytes) });
      });
    for (const f of files) if (f.chunk && !sources.has(f.chunk)) sources.set(f.chunk, { file: f.bytes });
    const todo = [...sources.keys()];
    const parallel = Math.min(options.parallel ?? 16, Math.max(1, todo.length));
    // Where each chunk lies once pushed: in a pack, or (null) an object of its own (pushed before packs).
    const placed = new Map<string, ChunkPlace | null>();
    const parentPlaces = parent ? placesOf(parent) : new Map<string, ChunkPlace>();
    let present = 0;
    let uploaded = 0;
    let uploadedBytes = 0;
    let done = 0;
    const progress = (n: number) => {
      const before = done;
      done += n;
      if (Math.floor(done / 64) !== Math.floor(before / 64) || done === todo.length) options.onProgress?.({ chunks: done, of: todo.length, uploadedBytes });
    };
    try {
      // 1. What the store holds already: what the parent names, else what a HEAD finds (young enough to trust).
      const missing = new Set<string>();
      let next = 0;
      const look = async () => {
        while (next < todo.length) {
          const hash = todo[next++];
          if (known.has(hash)) {
            placed.set(hash, parentPlaces.get(hash) ?? null);
            present++;
            progress(1);
            continue;
          }
          // A chunk found is trusted while no gc may take it (young); an old orphan is written again.
          const found = await this.objects.head(this.#chunkObject(hash));
          const place = found ? markedPlace(found) : undefined;
          if (found && place !== undefined && Date.now() - found.lastModified.getTime() < graceMs / 2) {
            placed.set(hash, place);
            present++;
            progress(1);
          } else if (place === null) {
            // An object of its own (pushed before packs), old: written again as it was, never replaced by a marker, which
            // would empty it under the images that name it as an object.
            const object = await this.#encode(hash, sources.get(hash)!, image);
            await this.objects.put(this.#chunkObject(hash), object);
            placed.set(hash, null);
            uploaded++;
            uploadedBytes += object.length;
            progress(1);
          } else missing.add(hash);
        }
      };
      await Promise.all(Array.from({ length: parallel }, look));

      // 2. The rest, in the image's order, into packs of about PACK_BYTES: a pack is uploaded, then each of its chunks is marked.
      let pack: { hash: string; object: Buffer }[] = [];
      let packBytes = 0;
      const uploads = new Set<Promise<void>>();
      const flush = async (chunks: { hash: string; object: Buffer }[]) => {
        const body = Buffer.concat(chunks.map((c) => c.object));
        const name = chunkHash(body);
        await this.objects.put(packKey(name), body);
        let offset = 0;
        const marks = chunks.map((c) => {
          const place = { pack: name, offset, length: c.object.length };
          offset += c.object.length;
          return { hash: c.hash, place };
        });
        let k = 0;
        const mark = async () => {
          while (k < marks.length) {
            const { hash, place } = marks[k++];
            await this.objects.put(this.#chunkObject(hash), Buffer.alloc(0), 'application/octet-stream', markerOf(place));
            placed.set(hash, place);
            progress(1);
          }
        };
        await Promise.all(Array.from({ length: Math.min(parallel, marks.length) }, mark));
        uploaded += chunks.length;
        uploadedBytes += body.length;
      };
      const send = async () => {
        const chunks = pack;
        pack = [];
        packBytes = 0;
        // A few packs in flight at once: the next is built while they go.
        while (uploads.size >= PACKS_IN_FLIGHT) await Promise.race(uploads);
        const upload: Promise<void> = flush(chunks).finally(() => uploads.delete(upload));
        uploads.add(upload);
        upload.catch(() => {}); // awaited below
      };
      for (const hash of todo) {
        if (!missing.has(hash)) continue;
        const object = await this.#encode(hash, sources.get(hash)!, image);
        pack.push({ hash, object });
        packBytes += object.length;
        if (packBytes >= PACK_BYTES) await send();
      }
      if (pack.length) await send();
      await Promise.all(uploads);

      // 3. The manifest, with every chunk's place.
      const packNames: string[] = [];
      const packIndex = new Map<string, number>();
      const placeOf = (hash: string): Place | null => {
        const p = placed.get(hash);
        if (!p) return null;
        let i = packIndex.get(p.pack);
        if (i === undefined) {
          i = packNames.push(p.pack) - 1;
          packIndex.set(p.pack, i);
        }
        return [i, p.offset, p.length];
      };
      for (const r of manifest.regions) r.places = r.chunks.map((c) => (c ? placeOf(c) : null));
      for (const f of manifest.files ?? []) if (f.chunk) f.place = placeOf(f.chunk);
      manifest.packs = packNames;
      finalBody = this.#manifestBytes(manifest);
      parseManifest(Buffer.from(JSON.stringify(manifest)), name);
      await this.objects.put(manifestKey(name), finalBody, 'application/json');
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
      repeatedChunks: total - zero - sources.size,
      presentChunks: present,
      uploadedChunks: uploaded,
      uploadedBytes: uploadedBytes + finalBody.length,
      uploadedRatio: Math.round(((uploadedBytes + finalBody.length) / bytes) * 1e4) / 1e4,
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
   * Deletes the chunks no image (nor a push under way) names, and the packs
   * no image names, once older than `graceMs`. Safe beside concurrent
   * pushes: a push names its chunks (pending) before it counts on any, and
   * trusts a chunk it finds (and so its pack, uploaded before it was marked)
   * only while it is younger than half the grace.
   */
  async gc(options: { graceMs?: number } = {}): Promise<GcReport> {
    const graceMs = options.graceMs ?? DEFAULT_GC_GRACE_MS;
    const started = Date.now();
    const named = new Set<string>();
    const namedPacks = new Set<string>();
    /** When the oldest push under way began: the packs it made, and those it trusted (younger than half the grace when it looked), are newer than this less the grace. */
    let oldestPush = Infinity;
    /** Per pack, the byte ranges images' places name (offset to length). */
    const needed = new Map<string, Map<number, number>>();
    let images = 0;
    let abandoned = 0;
    const readRoots = async () => {
      for await (const o of this.objects.list('images/')) {
        images++;
        const m = await this.manifest(o.key.slice('images/'.length).replace(/\.json$/, ''));
        for (const c of chunksOf(m)) named.add(this.#objectNameOf(c));
        for (const p of packsOf(m)) namedPacks.add(p);
        for (const place of placesOf(m).values()) {
          const ranges = needed.get(place.pack) ?? new Map<number, number>();
          ranges.set(place.offset, place.length);
          needed.set(place.pack, ranges);
        }
      }
      for await (const o of this.objects.list('pending/')) {
        if (started - o.lastModified.getTime() > PENDING_EXPIRES_MS) {
          await this.objects.delete([o.key]);
          abandoned++;
          continue;
        }
        const bytes = await this.objects.get(o.key).catch(() => null); // finished (deleted) meanwhile
        if (!bytes) continue;
        const pending = this.#readManifest(bytes, o.key);
        for (const c of chunksOf(pending)) named.add(this.#objectNameOf(c));
        for (const p of packsOf(pending)) namedPacks.add(p);
        oldestPush = Math.min(oldestPush, o.lastModified.getTime());
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
    // A pack goes when no image names it: one that some image still needs a chunk of stays whole.
    const packCandidates: { key: string; size: number; made: number }[] = [];
    let packs = 0;
    let packBytesUnneeded = 0;
    for await (const o of this.objects.list('packs/')) {
      packs++;
      const pack = o.key.slice(o.key.lastIndexOf('/') + 1);
      const ranges = needed.get(pack);
      if (ranges) packBytesUnneeded += Math.max(0, o.size - [...ranges.values()].reduce((n, l) => n + l, 0));
      if (!namedPacks.has(pack) && started - o.lastModified.getTime() > graceMs)
        packCandidates.push({ key: o.key, size: o.size, made: o.lastModified.getTime() });
    }
    images = 0;
    await readRoots(); // images and pushes that began while the chunks were listed
    const doomed = candidates.filter((c) => !named.has(c.key.slice(c.key.lastIndexOf('/') + 1)));
    const doomedPacks = packCandidates.filter((c) => !namedPacks.has(c.key.slice(c.key.lastIndexOf('/') + 1)) && c.made < oldestPush - graceMs);
    await this.objects.delete(doomed.map((c) => c.key));
    await this.objects.delete(doomedPacks.map((c) => c.key));
    const report = {
      images,
      chunks,
      kept: chunks - doomed.length,
      deleted: doomed.length,
      packs,
      packsDeleted: doomedPacks.length,
      packBytesUnneeded,
      bytesFreed: [...doomed, ...doomedPacks].reduce((n, c) => n + c.size, 0),
      abandonedPushes: abandoned,
    };
    this.#log.info({ store: this.url, ...report }, 'store collected');
    return report;
  }
}
