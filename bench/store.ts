// postcopy bench store: the snapshot store against a real S3 endpoint (the
// one `npm run store:up` starts, or any the AWS variables name), each figure
// beside its own baseline measured on the same store in the same run.
//
//   dedup    20 children of a base (1-5% of pages rewritten each) pushed with
//            their parent, per chunk size: bytes stored / (base + what differs)
//   cold     a restore with an empty cache, a workload touching a random 10%
//            of the pages: fault p50/p99 against a ranged GET of one chunk
//   warm     the same with the host cache warm: fault p50 against the floor's local case
//   full     time to full residency against a GET of the same bytes as one object
//   prefetch a cold start with its recorded working set against one without
//   fanout   16 restores of one image at once on this host (processes):
//            chunks fetched from the store / distinct chunks, and time against one alone
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Destination } from '../client/destination.js';
import type { StoreSession } from '../client/store-session.js';
import { Image } from '../lib/image.js';
import { PAGE_SIZE } from '../lib/memory.js';
import { coldStartOrder, shuffledOrder, touchPages } from '../lib/workload.js';
import { ChunkCache } from '../lib/store/chunk-cache.js';
import { DEFAULT_CHUNK_BYTES, chunkKey } from '../lib/store/chunk.js';
import { ObjectStore } from '../lib/store/object-store.js';
import { SnapshotStore } from '../lib/store/snapshot-store.js';
import { packKey, placesOf } from '../lib/store/manifest.js';
import { projectRoot } from '../lib/package-root.js';
import { interleaved, median, round } from './latency.js';
import { recordOnce } from './local.js';
import { runFloor, type FloorLatency } from './floor.js';
import { removeScratchDir, scratchDir, stopAtExit } from './cleanup.js';
import { guestSavedTwice } from './qemu.js';
import { pushQemuSnapshot } from '../server/qemu-store.js';
import { readManifest } from '../server/qemu-source.js';
import { silentLogger } from '../lib/logger.js';

export const STORE_CASES = ['dedup', 'guest', 'cold', 'full', 'warm', 'prefetch', 'fanout'] as const;
export type StoreCase = (typeof STORE_CASES)[number];

export interface StoreBenchOptions {
  pages: number;
  chunkSizes: number[];
  /** The cases to run (default: every one). */
  cases?: readonly StoreCase[];
  progress: (line: string) => void;
}

export type StoreBenchResult = Record<string, unknown> & { case: string };

/** A deterministic image that looks like memory: a quarter zero pages, a third text-like (compressible), the rest random. */
export function memoryLikeImage(pages: number, seed: number): Buffer {
  const bytes = Buffer.alloc(pages * PAGE_SIZE);
  let x = seed * 2654435761 || 1;
  const next = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const words = Buffer.from('the quick brown fox jumps over the lazy dog 0123456789 ');
  for (let p = 0; p < pages; p++) {
    const kind = next() % 100;
    const page = bytes.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
    if (kind < 25) continue;
    if (kind < 58) {
      for (let off = 0; off < PAGE_SIZE; off += words.length) words.copy(page, off);
      page.writeUInt32LE(next(), (next() % 1000) * 4);
    } else {
      const words32 = new Uint32Array(page.buffer, page.byteOffset, PAGE_SIZE / 4);
      for (let i = 0; i < words32.length; i++) words32[i] = next();
    }
  }
  return bytes;
}

export async function storeBench(options: StoreBenchOptions): Promise<StoreBenchResult[]> {
  if (!process.env.AWS_ENDPOINT_URL_S3 && !process.env.AWS_ENDPOINT_URL)
    throw new Error('bench store needs an S3 endpoint: eval "$(npm run --silent store:up)" starts one here (or set the AWS variables for another)');
  const bucket = `postcopy-bench-${randomBytes(4).toString('hex')}`;
  const objects = new ObjectStore({ bucket, prefix: '' });
  await objects.createBucket();
  const dir = scratchDir('postcopy-bench-store-');
  const results: StoreBenchResult[] = [];
  const runs = (c: StoreCase) => !options.cases || options.cases.includes(c);
  try {
    for (const chunk of options.chunkSizes) {
      if (runs('dedup')) {
        options.progress(`dedup: 20 children of a base, chunks of ${chunk / 1024} KiB`);
        results.push(await dedup(bucket, `dedup-${chunk}`, Math.min(options.pages, 16384), chunk));
      }
      if (runs('cold')) {
        options.progress(`cold: a random 10% of ${options.pages} pages from the store, chunks of ${chunk / 1024} KiB`);
        results.push(await cold(bucket, `cold-${chunk}`, options.pages, chunk, dir, false));
      }
      if (runs('full')) {
        options.progress(`full: time to full residency, beside a GET of the same bytes as one object, chunks of ${chunk / 1024} KiB`);
        results.push(await full(bucket, `full-${chunk}`, options.pages, chunk, dir));
      }
    }
    if (runs('guest')) {
      options.progress('guest: the QEMU test guest saved twice, seconds apart, each save pushed whole');
      results.push(await guest(bucket, 'guest', dir, options.progress));
    }
    if (runs('warm')) {
      options.progress("warm: the same with the host cache warm, beside the floor's local case");
      results.push(await cold(bucket, 'warm', options.pages, DEFAULT_CHUNK_BYTES, dir, true));
    }
    if (runs('prefetch')) {
      options.progress('prefetch: a cold start from the store with its recorded working set, against one without');
      results.push(await prefetch(bucket, Math.min(options.pages, 16384), 3));
    }
    if (runs('fanout')) {
      options.progress('fanout: 16 restores of one image at once on this host');
      results.push(await fanout(bucket, Math.min(options.pages, 16384), dir));
    }
  } finally {
    const names: string[] = [];
    for await (const o of objects.list('')) names.push(o.key);
    await objects.delete(names, 64).catch(() => {});
    objects.close();
    removeScratchDir(dir);
  }
  return results;
}

async function storedBytes(store: SnapshotStore): Promise<number> {
  let n = 0;
  for await (const o of store.objects.list('chunks/')) n += o.size;
  for await (const o of store.objects.list('packs/')) n += o.size;
  return n;
}

async function dedup(bucket: string, prefix: string, pages: number, chunkBytes: number): Promise<StoreBenchResult> {
  const store = new SnapshotStore({ bucket, prefix });
  const base = memoryLikeImage(pages, 1);
  const open = (b: Buffer) => Image.open([{ buffer: b }]);
  try {
    const baseImage = open(base);
    const pushedBase = await store.push(baseImage, 'base', { chunkBytes });
    baseImage.close();
    const baseStored = await storedBytes(store);
    let differing = 0;
    const pushedRatios: number[] = [];
    for (let c = 0; c < 20; c++) {
      const child = childOf(base, 1 + (c % 5), 7 + c * 7919); // 1-5% of pages written
      const changed = countDiffering(base, child);
      differing += changed * PAGE_SIZE;
      const image = open(child);
      const r = await store.push(image, `child-${c}`, { parent: 'base', chunkBytes });
      image.close();
      pushedRatios.push(r.uploadedBytes / (changed * PAGE_SIZE));
    }
    const stored = await storedBytes(store);
    return {
      case: 'dedup',
      chunkBytes,
      pages,
      images: 21,
      baseBytes: base.length,
      baseStoredBytes: baseStored,
      baseUploadedBytes: pushedBase.uploadedBytes,
      differingBytes: differing,
      storedBytes: stored,
      // Stored against what must be kept at least: the base and what each child changed.
      storedBytesRatio: round(stored / (base.length + differing), 3),
      // Compressed base as the yardstick: what the children added over it, against what they changed.
      childrenStoredRatio: round((stored - baseStored) / differing, 2),
      pushedBytesRatio: round(median(pushedRatios), 2),
    };
  } finally {
    store.close();
  }
}

/**
 * The QEMU test guest saved twice, two of its passes apart, each save pushed
 * as a whole image with no parent named (as `qemu save --out s3://` does):
 * what the second save added to the store against the pages that differ
 * between the two.
 */
async function guest(bucket: string, prefix: string, dir: string, progress: (line: string) => void): Promise<StoreBenchResult> {
  const children: ChildProcess[] = [];
  const store = new SnapshotStore({ bucket, prefix });
  try {
    const at = join(dir, 'guest');
    mkdirSync(at);
    const [first, second] = await guestSavedTwice(at, 32, children, progress);
    for (const c of children) c.kill('SIGKILL');
    const firstPush = await pushQemuSnapshot(first, { bucket, prefix, name: 'guest-1' }, silentLogger);
    const firstStored = await storedBytes(store);
    const secondPush = await pushQemuSnapshot(second, { bucket, prefix, name: 'guest-2' }, silentLogger);
    const stored = await storedBytes(store);
    // The RAM, block by block: its bytes, those not zero in the first save, and the pages that differ between the two.
    let ramBytes = 0;
    let dataBytes = 0;
    let differing = 0;
    const blocksOf = (d: string) => new Map(readManifest(d).blocks.map((b) => [b.name, readFileSync(join(d, b.file))]));
    const [a, b] = [blocksOf(first), blocksOf(second)];
    for (const [name, one] of a) {
      const two = b.get(name) ?? Buffer.alloc(0);
      ramBytes += one.length;
      for (let p = 0; p < one.length / PAGE_SIZE; p++) {
        const page = one.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
        if (page.some((x) => x !== 0)) dataBytes += PAGE_SIZE;
        if ((p + 1) * PAGE_SIZE > two.length || page.compare(two, p * PAGE_SIZE, (p + 1) * PAGE_SIZE) !== 0) differing += PAGE_SIZE;
      }
    }
    return {
      case: 'guest',
      chunkBytes: DEFAULT_CHUNK_BYTES,
      ramBytes,
      dataBytes,
      differingBytes: differing,
      firstUploadedBytes: firstPush.uploadedBytes,
      secondUploadedBytes: secondPush.uploadedBytes,
      firstStoredBytes: firstStored,
      storedBytes: stored,
      // Stored against what must be kept at least: the first save's data and what the second changed (neither compressed).
      storedBytesRatio: round(stored / (dataBytes + differing), 3),
      // The second save: what it uploaded against what changed.
      pushedBytesRatio: differing > 0 ? round(secondPush.uploadedBytes / differing, 2) : null,
    };
  } finally {
    for (const c of children) c.kill('SIGKILL');
    store.close();
  }
}

function countDiffering(a: Buffer, b: Buffer): number {
  let n = 0;
  for (let p = 0; p < a.length / PAGE_SIZE; p++) if (a.compare(b, p * PAGE_SIZE, (p + 1) * PAGE_SIZE, p * PAGE_SIZE, (p + 1) * PAGE_SIZE) !== 0) n++;
  return n;
}

/** Fault latency of a restore from the store touching a random tenth of the pages (no background). */
async function cold(bucket: string, prefix: string, pages: number, chunkBytes: number, dir: string, warm: boolean): Promise<StoreBenchResult> {
  const store = new SnapshotStore({ bucket, prefix });
  const bytes = memoryLikeImage(pages, 2);
  const image = Image.open([{ buffer: bytes }]);
  const cacheDir = join(dir, `cache-${prefix}`);
  try {
    await store.push(image, 'vm', { chunkBytes });
    const manifest = await store.manifest('vm');
    const touched = shuffledOrder(pages, 5).subarray(0, Math.floor(pages / 10));
    const hashes = manifest.regions[0].chunks.filter((c) => c);
    const places = placesOf(manifest);
    // The baseline: a ranged GET of one chunk from its pack (a GET of its object, pushed before packs), on the same store.
    const gets: number[] = [];
    /** The baseline's own bytes: they go through the same store client, so its figures hold them too (taken out below). */
    let baselineBytes = 0;
    const baselineGets = async (n: number) => {
      for (let i = 0; i < n; i++) {
        const hash = hashes[(gets.length * 7) % hashes.length];
        const place = places.get(hash);
        const started = process.hrtime.bigint();
        const body = await (place
          ? store.objects.get(packKey(place.pack), [place.offset, place.offset + place.length - 1])
          : store.objects.get(chunkKey(hash)));
        gets.push(Number(process.hrtime.bigint() - started) / 1e3);
        baselineBytes += body.length;
      }
    };
    /**
     * Touches the pages in `slices` parts. With `between`, it runs after each
     * part, the host cache's writes done first: the baseline is measured in
     * the same minutes as the faults (this store's speed drifts between them).
     */
    const restoreOnce = async (background = false, slices = 1, between?: () => Promise<void>, fetchInEngine = true) => {
      const cache = new ChunkCache({ dir: cacheDir, maxBytes: 8 * 2 ** 30 });
      const dest = await Destination.connect({ storeImage: { store, name: 'vm' }, cache, background: { enabled: background }, fetchInEngine });
      try {
        const r = dest.regions[0].mapping;
        let touchNs = 0;
        for (let k = 0; k < slices; k++) {
          const part = touched.subarray(Math.floor((k * touched.length) / slices), Math.floor(((k + 1) * touched.length) / slices));
          touchNs += (await touchPages(r.address, pages, part, { mapping: r })).totalNs;
          if (between) {
            await cache.settled();
            await between();
          }
        }
        const fetched = (dest.session as StoreSession).fetched;
        // The faults' own wait (the engine's figures), not every touch: most touches find their page in already.
        const f = dest.stats().faultLatency;
        const faults = { count: f.count, p50_us: round(f.p50Ns / 1e3), p99_us: round(f.p99Ns / 1e3), touchMs: round(touchNs / 1e6) };
        // Only pages touched are read here: this thread must never touch a missing page (only it can fetch it).
        for (const p of touched.subarray(0, 64))
          if (Buffer.compare(r.buffer(p * PAGE_SIZE, PAGE_SIZE), bytes.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)) !== 0)
            throw new Error(`page ${p} differs from the image`);
        return { latency: faults, fetched };
      } finally {
        dest.close();
      }
    };
    if (!warm) {
      // 200 baseline GETs, 25 after each eighth of the workload.
      const first = await restoreOnce(false, 8, () => baselineGets(25));
      // The same touches with the background fetching the rest meanwhile (an empty cache again): what faults pay for it.
      rmSync(cacheDir, { recursive: true, force: true });
      const withBackground = (await restoreOnce(true)).latency;
      // The same with every chunk through the feeder (JavaScript), as before the engine fetched faults' chunks itself.
      rmSync(cacheDir, { recursive: true, force: true });
      const feeder = (await restoreOnce(false, 8, () => baselineGets(25), false)).latency;
      gets.sort((a, b) => a - b);
      const get = { p50_us: round(gets[gets.length >> 1]), p99_us: round(gets[Math.floor(gets.length * 0.99)]) };
      const inEngine = first.fetched.inEngine;
      // The engine's own GETs' mean (request to chunk checked): the part of a fault the store and the link take.
      const inEngineGetUs = inEngine.faultPieces > 0 ? round(inEngine.getNs / 1e3 / inEngine.faultPieces) : null;
      return {
        case: 'cold',
        chunkBytes,
        pages,
        touchedPages: touched.length,
        ours: first.latency,
        chunkGet: get,
        ratio: { p50: round(first.latency.p50_us / get.p50_us), p99: round(first.latency.p99_us / get.p99_us) },
        withBackground,
        withBackgroundRatio: { p50: round(withBackground.p50_us / get.p50_us), p99: round(withBackground.p99_us / get.p99_us) },
        feeder,
        feederRatio: { p50: round(feeder.p50_us / get.p50_us), p99: round(feeder.p99_us / get.p99_us) },
        piecesInEngine: inEngine.pieces,
        inEngineGet: { mean_us: inEngineGetUs },
        overInEngineGet: inEngineGetUs ? round(first.latency.p50_us / inEngineGetUs) : null,
        chunksFetched: first.fetched.chunks + inEngine.pieces,
        bytesFetched: first.fetched.store.bytesFetched - baselineBytes,
        fetchedBytesRatio: round((first.fetched.store.bytesFetched - baselineBytes) / (touched.length * PAGE_SIZE), 2),
      };
    }
    await restoreOnce(); // fills the cache
    // Warm: the cache holds what the first restore fetched; the same touches again, beside the floor's local case.
    const again = await restoreOnce();
    const floor = (await runFloor(pages, 5, ['local'])).get('local') as FloorLatency;
    return {
      case: 'warm',
      chunkBytes,
      pages,
      touchedPages: touched.length,
      ours: again.latency,
      cacheHits: (again.fetched.cache?.hits ?? 0) + again.fetched.piecesFromCache,
      piecesFromCache: again.fetched.piecesFromCache,
      storeGets: again.fetched.store.gets,
      floorLocal: { p50_us: floor.p50_us, p99_us: floor.p99_us },
      ratio: { p50: round(again.latency.p50_us / floor.p50_us) },
    };
  } finally {
    image.close();
    store.close();
    rmSync(cacheDir, { recursive: true, force: true });
  }
}

async function full(bucket: string, prefix: string, pages: number, chunkBytes: number, dir: string): Promise<StoreBenchResult> {
  const store = new SnapshotStore({ bucket, prefix });
  const bytes = memoryLikeImage(pages, 3);
  const image = Image.open([{ buffer: bytes }]);
  try {
    await store.push(image, 'vm', { chunkBytes });
    await store.objects.put('whole.bin', bytes);
    const runs: { ours: number; get: number }[] = [];
    for (let round_ = 0; round_ < 3; round_++) {
      const started = process.hrtime.bigint();
      await store.objects.get('whole.bin');
      const get = Number(process.hrtime.bigint() - started) / 1e6;
      const t0 = process.hrtime.bigint();
      const dest = await Destination.connect({
        storeImage: { store, name: 'vm' },
        cache: new ChunkCache({ dir: join(dir, `full-${round_}`), maxBytes: 8 * 2 ** 30 }),
      });
      try {
        const report = await dest.finish();
        if (!report.digestMatch) throw new Error('the restore differs from the image');
      } finally {
        dest.close();
      }
      runs.push({ ours: Number(process.hrtime.bigint() - t0) / 1e6, get });
      rmSync(join(dir, `full-${round_}`), { recursive: true, force: true });
    }
    const ratios = runs.map((r) => r.ours / r.get);
    return {
      case: 'full',
      chunkBytes,
      pages,
      bytes: bytes.length,
      oursMs: round(median(runs.map((r) => r.ours))),
      wholeGetMs: round(median(runs.map((r) => r.get))),
      ratio: round(median(ratios)),
      spread: [round(Math.min(...ratios)), round(Math.max(...ratios))],
    };
  } finally {
    image.close();
    store.close();
  }
}

/**
 * A cold start (a stable 15% working set in a new order, and a few pages of
 * its own) from the store with an empty cache, with and without --prefetch
 * of the set recorded once, each timed from the restore's start to the workload's end:
 * interleaved rounds, the median of the ratios.
 */
async function prefetch(bucket: string, pages: number, rounds: number): Promise<StoreBenchResult> {
  const store = new SnapshotStore({ bucket, prefix: 'prefetch' });
  const image = Image.open([{ buffer: memoryLikeImage(pages, 6) }]);
  try {
    await store.push(image, 'vm');
    const from = { storeImage: { store, name: 'vm' }, cache: false as const };
    const set = await recordOnce(from, pages);
    const run = async (seed: number, withSet: boolean) => {
      // From the restore's start (what the set fetched while it connects counts, as does what connecting cost) to the workload's end.
      const started = performance.now();
      const dest = await Destination.connect({ ...from, ...(withSet ? { prefetch: set } : {}) });
      try {
        const r = dest.regions[0].mapping;
        await touchPages(r.address, pages, coldStartOrder(pages, seed), { mapping: r });
        const ms = performance.now() - started;
        const report = await dest.finish();
        if (!report.digestMatch) throw new Error('the restore differs from the image');
        return { ms, demandFaults: report.pagesOnDemand };
      } finally {
        dest.close();
      }
    };
    const { a: without, b: withSet } = await interleaved(
      rounds,
      (r) => run(100 + r, false),
      (r) => run(100 + r, true),
    );
    const time = withSet.map((w, i) => w.ms / without[i].ms);
    const faults = withSet.map((w, i) => w.demandFaults / Math.max(1, without[i].demandFaults));
    return {
      case: 'prefetch',
      pages,
      rounds,
      workingSetPages: set.entries.length / 8,
      withoutMs: round(median(without.map((w) => w.ms))),
      withMs: round(median(withSet.map((w) => w.ms))),
      timeRatio: round(median(time)),
      faultsRatio: round(median(faults)),
      spread: { time: [round(Math.min(...time)), round(Math.max(...time))] },
    };
  } finally {
    image.close();
    store.close();
  }
}

/** `base` with `share` percent of its pages written (a few bytes each), deterministically from `seed`. */
function childOf(base: Buffer, share: number, seed: number): Buffer {
  const child = Buffer.from(base);
  const pages = base.length / PAGE_SIZE;
  let x = seed;
  for (let k = 0; k < Math.round((pages * share) / 100); k++) {
    x = (x * 1103515245 + 12345) >>> 0;
    child.writeUInt32LE(x, (x % pages) * PAGE_SIZE + ((x >>> 8) % 1024) * 4);
  }
  return child;
}

/**
 * 16 restores at once on this host, sharing its chunk cache: of one image,
 * and of 4 images that share a base (pushed with it as their parent, 3% of
 * pages their own), 4 restores each. Chunks fetched from the store against
 * the distinct chunks the restores need, and each restore's time against one
 * alone.
 */
async function fanout(bucket: string, pages: number, dir: string): Promise<StoreBenchResult> {
  const store = new SnapshotStore({ bucket, prefix: 'fanout' });
  const base = memoryLikeImage(pages, 4);
  const image = Image.open([{ buffer: base }]);
  try {
    const pushed = await store.push(image, 'vm');
    const distinct = pushed.uploadedChunks;
    const children = [1, 2, 3, 4].map((c) => childOf(base, 3, 1000 + c));
    for (const [c, bytes] of children.entries()) {
      const child = Image.open([{ buffer: bytes }]);
      await store.push(child, `child-${c}`, { parent: 'vm' });
      child.close();
    }
    const needed = new Set<string>();
    for (let c = 0; c < children.length; c++) for (const hash of (await store.manifest(`child-${c}`)).regions[0].chunks) if (hash) needed.add(hash);
    const cli = join(projectRoot(), 'dist', 'bin', 'postcopy.js');
    const run = async (name: string, cache: string) => {
      const started = process.hrtime.bigint();
      const child = stopAtExit(
        spawn(process.execPath, [cli, 'restore', '--image', `s3://${bucket}/fanout/${name}`, '--cache-dir', cache, '--json', '--log-level', 'warn'], {
          stdio: ['ignore', 'pipe', 'inherit'],
        }),
      );
      let out = '';
      child.stdout.on('data', (d) => (out += d));
      const [code] = await once(child, 'close');
      if (code !== 0) throw new Error(`a restore exited ${code}`);
      const report = JSON.parse(out.trim());
      return { ms: Number(process.hrtime.bigint() - started) / 1e6, misses: report.source.cache.misses as number };
    };
    const alone = await run('vm', join(dir, 'fanout-alone'));
    const many = await Promise.all(Array.from({ length: 16 }, () => run('vm', join(dir, 'fanout-shared'))));
    const layered = await Promise.all(Array.from({ length: 16 }, (_, i) => run(`child-${i % 4}`, join(dir, 'fanout-layered'))));
    const fetched = many.reduce((n, r) => n + r.misses, 0);
    const layeredFetched = layered.reduce((n, r) => n + r.misses, 0);
    writeFileSync(join(dir, 'fanout-done'), '');
    return {
      case: 'fanout',
      pages,
      restores: 16,
      distinctChunks: distinct,
      chunksFetched: fetched,
      fetchedChunksRatio: round(fetched / distinct, 3),
      aloneMs: round(alone.ms),
      eachMsMedian: round(median(many.map((r) => r.ms))),
      timeRatio: round(median(many.map((r) => r.ms)) / alone.ms),
      layered: {
        images: children.length,
        distinctChunks: needed.size,
        chunksFetched: layeredFetched,
        fetchedChunksRatio: round(layeredFetched / needed.size, 3),
        eachMsMedian: round(median(layered.map((r) => r.ms))),
        timeRatio: round(median(layered.map((r) => r.ms)) / alone.ms),
      },
    };
  } finally {
    image.close();
    store.close();
  }
}

export function storeTable(results: StoreBenchResult[]): string {
  const lines = ['| case | chunk | figure | ours | baseline | ratio |', '| --- | --- | --- | --- | --- | --- |'];
  for (const r of results) {
    const chunk = r.chunkBytes ? `${(r.chunkBytes as number) / 1024} KiB` : '';
    if (r.case === 'dedup')
      lines.push(
        `| dedup | ${chunk} | stored bytes, 21 images | ${r.storedBytes} | ${(r.baseBytes as number) + (r.differingBytes as number)} (base + differing) | ${r.storedBytesRatio} |`,
      );
    else if (r.case === 'guest') {
      lines.push(
        `| guest | ${chunk} | stored bytes, the QEMU guest saved twice | ${r.storedBytes} | ${(r.dataBytes as number) + (r.differingBytes as number)} (data + differing) | ${r.storedBytesRatio} |`,
      );
      lines.push(`| guest | ${chunk} | bytes the second save uploaded | ${r.secondUploadedBytes} | ${r.differingBytes} (differing) | ${r.pushedBytesRatio} |`);
    } else if (r.case === 'cold') {
      const o = r.ours as { p50_us: number; p99_us: number };
      const g = r.chunkGet as { p50_us: number; p99_us: number };
      const ratio = r.ratio as { p50: number; p99: number };
      lines.push(
        `| cold | ${chunk} | fault p50 / p99 (µs) | ${o.p50_us} / ${o.p99_us} | ${g.p50_us} / ${g.p99_us} (ranged GET of a chunk) | ${ratio.p50} / ${ratio.p99} |`,
      );
      lines.push(`| cold | ${chunk} | bytes fetched / needed | ${r.bytesFetched} | ${(r.touchedPages as number) * PAGE_SIZE} | ${r.fetchedBytesRatio} |`);
      const b = r.withBackground as { p50_us: number; p99_us: number };
      const br = r.withBackgroundRatio as { p50: number; p99: number };
      lines.push(
        `| cold | ${chunk} | the same, background on: fault p50 / p99 (µs) | ${b.p50_us} / ${b.p99_us} | ${g.p50_us} / ${g.p99_us} (ranged GET of a chunk) | ${br.p50} / ${br.p99} |`,
      );
      const f = r.feeder as { p50_us: number; p99_us: number };
      const fr = r.feederRatio as { p50: number; p99: number };
      lines.push(
        `| cold | ${chunk} | the same, every chunk through the feeder: fault p50 / p99 (µs) | ${f.p50_us} / ${f.p99_us} | ${g.p50_us} / ${g.p99_us} (ranged GET of a chunk) | ${fr.p50} / ${fr.p99} |`,
      );
      const e = r.inEngineGet as { mean_us: number | null };
      if (e.mean_us !== null)
        lines.push(
          `| cold | ${chunk} | fault p50 / the engine's own GET, mean (µs) | ${o.p50_us} | ${e.mean_us} (GET, decode, check) | ${r.overInEngineGet} |`,
        );
    } else if (r.case === 'warm') {
      const o = r.ours as { p50_us: number };
      const f = r.floorLocal as { p50_us: number };
      lines.push(`| warm | ${chunk} | fault p50 (µs) | ${o.p50_us} | ${f.p50_us} (floor, local) | ${(r.ratio as { p50: number }).p50} |`);
    } else if (r.case === 'full') lines.push(`| full | ${chunk} | time to full residency (ms) | ${r.oursMs} | ${r.wholeGetMs} (one GET) | ${r.ratio} |`);
    else if (r.case === 'prefetch')
      lines.push(
        `| prefetch | ${DEFAULT_CHUNK_BYTES / 1024} KiB | cold start with its working set, from the restore's start (ms) | ${r.withMs} | ${r.withoutMs} (without) | ${r.timeRatio} |`,
      );
    else if (r.case === 'fanout') {
      lines.push(
        `| fanout | ${DEFAULT_CHUNK_BYTES / 1024} KiB | chunks fetched, 16 restores | ${r.chunksFetched} | ${r.distinctChunks} distinct | ${r.fetchedChunksRatio} |`,
      );
      lines.push(`| fanout | ${DEFAULT_CHUNK_BYTES / 1024} KiB | each restore's time (ms) | ${r.eachMsMedian} | ${r.aloneMs} (one alone) | ${r.timeRatio} |`);
      const l = r.layered as {
        images: number;
        distinctChunks: number;
        chunksFetched: number;
        fetchedChunksRatio: number;
        eachMsMedian: number;
        timeRatio: number;
      };
      lines.push(
        `| fanout | ${DEFAULT_CHUNK_BYTES / 1024} KiB | chunks fetched, 16 restores of ${l.images} images sharing a base | ${l.chunksFetched} | ${l.distinctChunks} distinct | ${l.fetchedChunksRatio} |`,
      );
      lines.push(
        `| fanout | ${DEFAULT_CHUNK_BYTES / 1024} KiB | each restore's time (ms), ${l.images} images | ${l.eachMsMedian} | ${r.aloneMs} (one alone) | ${l.timeRatio} |`,
      );
    }
  }
  return lines.join('\n') + '\n';
}
