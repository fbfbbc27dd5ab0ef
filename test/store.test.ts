// The snapshot store on a real Ceph RGW (test/store/up.sh): images pushed as
// content-named chunks, restored lazily with no source process through the
// real userfaultfd, deduplicated against a parent, kept by ls/rm/gc, and
// every chunk checked against its name before a page of it is installed.
import t from 'tap';
import { once } from 'node:events';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { brotliCompressSync } from 'node:zlib';
import { Image } from '../lib/image.js';
import { Destination } from '../client/destination.js';
import { SnapshotStore } from '../lib/store/snapshot-store.js';
import { ChunkCache, lockSlotOffset } from '../lib/store/chunk-cache.js';
import { native } from '../lib/native.js';
import { parseStoreUrl } from '../lib/store/address.js';
import { TenantKey } from '../lib/store/tenant.js';
import { CHUNK_HEADER_BYTES, Codec, DEFAULT_CHUNK_BYTES, chunkKey } from '../lib/store/chunk.js';
import { chunksOf, manifestKey, packKey, placesOf, type Manifest } from '../lib/store/manifest.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import type { StoreSession } from '../client/store-session.js';
import { PAGE, buildFixture, cliCommand, randomImage, runCli, spawnCli, startServeCli, tempDir, until } from './helpers.js';
import { freshBucket, ownGateway } from './store/env.js';
import type { Test } from 'tap';

/** `pages` random pages, every 7th zero, and a run of 300 zero pages (whole zero chunks). */
function imageBytes(pages: number, seed = 0): Buffer {
  const bytes = randomImage(pages, 7);
  bytes.fill(0, Math.min(pages, 500) * PAGE, Math.min(pages, 800) * PAGE);
  if (seed) for (let p = 0; p < pages; p += 97) bytes.writeUInt32LE(seed, p * PAGE + 8);
  return bytes;
}

async function countObjects(store: SnapshotStore, under: string): Promise<number> {
  let n = 0;
  for await (const _ of store.objects.list(under)) n++;
  return n;
}

async function storeFor(t: Test, prefix = 'images'): Promise<SnapshotStore> {
  const url = `${await freshBucket(t)}/${prefix}`;
  const store = new SnapshotStore(parseStoreUrl(url));
  t.teardown(() => store.close());
  return store;
}

/** `bytes` as a one-region image, closed when the test ends. */
function openImage(t: Test, bytes: Buffer): Image {
  const image = Image.open([{ buffer: bytes }]);
  t.teardown(() => image.close());
  return image;
}

async function restoreAll(t: Test, store: SnapshotStore, name: string, cache: ChunkCache | false, order?: Uint32Array, background = true) {
  const dest = await Destination.connect({ storeImage: { store, name }, cache, background: { enabled: background } });
  t.teardown(() => dest.close());
  const touching = dest.regions.map((r) => {
    const pages = r.mapping.length / PAGE;
    return touchPages(r.mapping.address, pages, order ?? shuffledOrder(pages, 3), { mapping: r.mapping });
  });
  const [report] = await Promise.all([dest.finish(), ...touching]);
  return { dest, report, session: dest.session as StoreSession };
}

/** A chunk's object as stored: its range of a pack (or, pushed before packs, an object of its own). */
async function chunkObject(store: SnapshotStore, manifest: Manifest, hash: string): Promise<Buffer> {
  const place = placesOf(manifest).get(hash);
  return place ? store.objects.get(packKey(place.pack), [place.offset, place.offset + place.length - 1]) : store.objects.get(chunkKey(hash));
}

/**
 * A working set recorded from a restore of `from` that touches the first page
 * of each of `chunks`, in that order, and nothing else (background held).
 */
async function recordChunks(t: Test, from: { storeImage: { store: SnapshotStore; name: string }; cache: false }, pages: number, chunks: number[]) {
  const per = DEFAULT_CHUNK_BYTES / PAGE;
  const rec = await Destination.connect({ ...from, holdBackground: true, recordWorkingSet: true });
  t.teardown(() => rec.close());
  const r = rec.regions[0].mapping;
  await touchPages(
    r.address,
    pages,
    Uint32Array.from(chunks, (c) => c * per),
    { mapping: r },
  );
  const set = rec.workingSet();
  rec.close();
  return set;
}

/** Each of `chunks` as in the image. Read only chunks known resident: this thread must never touch a missing page. */
function chunksAsInImage(t: Test, dest: Destination, bytes: Buffer, chunks: number[]): void {
  const per = DEFAULT_CHUNK_BYTES / PAGE;
  const m = dest.regions[0].mapping;
  for (const c of chunks)
    t.equal(Buffer.compare(m.buffer(c * per * PAGE, per * PAGE), bytes.subarray(c * per * PAGE, (c + 1) * per * PAGE)), 0, `chunk ${c} as in the image`);
}

t.test('an image pushed to the store restores byte-exact with no source process: faults fetch their chunks, the background the rest', async (t) => {
  const store = await storeFor(t);
  const bytes = imageBytes(2048);
  const second = randomImage(100, 0);
  const image = Image.open([{ buffer: bytes }, { buffer: second }]);
  t.teardown(() => image.close());
  const pushed = await store.push(image, 'base');
  const perChunk = DEFAULT_CHUNK_BYTES / PAGE;
  t.equal(pushed.chunks, 2048 / perChunk + Math.ceil(100 / perChunk), 'each region in chunks of the default size, the last one short');
  t.ok(pushed.zeroChunks >= 1, `a whole chunk of zeros is not stored (${pushed.zeroChunks})`);
  t.equal(pushed.uploadedChunks, pushed.chunks - pushed.zeroChunks, 'every other chunk uploaded once');
  const { dest, report, session } = await restoreAll(t, store, 'base', new ChunkCache({ dir: tempDir(t) }));
  t.equal(report.digestMatch, true, 'the regions equal the manifest');
  t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(bytes), 'region 0 byte for byte');
  t.ok(Buffer.from(dest.regions[1].mapping.buffer()).equals(second), 'region 1 byte for byte');
  t.equal(report.bytesReceived, 0, 'nothing came over a page socket');
  const fetched = session.fetched;
  t.equal(fetched.chunks, pushed.uploadedChunks, 'each stored chunk fetched once');
  t.ok(
    fetched.store.gets <= pushed.uploadedChunks + 1,
    `the manifest and the chunks: ${fetched.store.gets} GETs, at most one a chunk (neighbours in a pack share one)`,
  );
  t.equal(dest.status().state, 'verified');
  t.same(report.window, { forward: 0, backward: 0 }, 'no window past the chunk by default: a fault brings its whole chunk');
  const windowed = await Destination.connect({ storeImage: { store, name: 'base' }, cache: false, window: { forward: 8, backward: 2 } });
  t.teardown(() => windowed.close());
  const again = await windowed.finish();
  t.same(again.window, { forward: 8, backward: 2 }, 'a window asked for is kept');
});

t.test('compressible pages are stored as zstd, and a chunk of the older brotli layout in the same image still restores, byte-exact', async (t) => {
  const store = await storeFor(t);
  // Text-like pages (what most of a guest compresses like), every 5th page random.
  const pages = 512;
  const bytes = Buffer.alloc(pages * PAGE);
  for (let p = 0; p < pages; p++) {
    if (p % 5 === 4) randomBytes(PAGE).copy(bytes, p * PAGE);
    else bytes.write(`page ${p} of a guest's memory, restored from the store; `.repeat(64).slice(0, PAGE), p * PAGE);
  }
  const image = openImage(t, bytes);
  await store.push(image, 'text');
  const manifest = await store.manifest('text');
  const chunks = manifest.regions[0].chunks;
  const objects = await Promise.all(chunks.map((c) => chunkObject(store, manifest, c)));
  t.ok(
    objects.every((o) => o[1] === Codec.zstd),
    'every chunk object is zstd',
  );
  const stored = objects.reduce((n, o) => n + o.length, 0);
  t.ok(stored < bytes.length / 2, `stored in ${stored} bytes of ${bytes.length}`);
  // The first chunk rewritten as a push before packs and zstd wrote it: an object of its own, brotli.
  const plain = bytes.subarray(0, DEFAULT_CHUNK_BYTES);
  const header = Buffer.from(objects[0].subarray(0, CHUNK_HEADER_BYTES));
  header[1] = Codec.brotli;
  await store.objects.put(chunkKey(chunks[0]), Buffer.concat([header, brotliCompressSync(plain)]));
  manifest.regions[0].places![0] = null;
  await store.objects.put(manifestKey('text'), Buffer.from(JSON.stringify(manifest)));
  const { dest, report } = await restoreAll(t, store, 'text', new ChunkCache({ dir: tempDir(t) }));
  t.equal(report.digestMatch, true);
  t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(bytes), 'byte for byte');
});

t.test('chunks lie in packs: the background fetches neighbours with one ranged GET each, far fewer GETs than chunks, byte-exact', async (t) => {
  const store = await storeFor(t);
  const pages = 4096;
  const bytes = randomImage(pages, 0);
  const image = openImage(t, bytes);
  const pushed = await store.push(image, 'packed');
  const manifest = await store.manifest('packed');
  const chunks = pages / (DEFAULT_CHUNK_BYTES / PAGE);
  t.equal(pushed.uploadedChunks, chunks);
  t.equal(manifest.version, 2);
  t.equal(manifest.packs!.length, 2, 'about 8 MiB a pack: 16 MiB of random pages in two');
  t.ok(
    manifest.regions[0].places!.every((p) => p !== null),
    'every chunk has its place in a pack',
  );
  // No workload: only the background, which opens up at once and groups neighbours.
  const dest = await Destination.connect({ storeImage: { store, name: 'packed' }, cache: false });
  t.teardown(() => dest.close());
  const report = await dest.finish();
  t.equal(report.digestMatch, true, 'byte for byte');
  t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(bytes));
  const fetched = (dest.session as StoreSession).fetched;
  t.equal(fetched.chunks, chunks, 'every chunk fetched once');
  t.ok(fetched.store.gets <= chunks / 4, `${fetched.store.gets} GETs for ${chunks} chunks`);
  // A push of the same content under another name, with no parent: every chunk found by its marker, nothing uploaded but the manifest.
  const again = await store.push(image, 'packed-again');
  t.equal(again.uploadedChunks, 0, 'found in the store: nothing uploaded');
  t.same((await store.manifest('packed-again')).packs, manifest.packs, 'the same packs named');
});

t.test(
  'an image of the layout before packs (manifest version 1, every chunk an object of its own) restores byte-exact, and a child pushed against it shares its chunks',
  async (t) => {
    const store = await storeFor(t);
    const bytes = imageBytes(1024);
    const image = openImage(t, bytes);
    await store.push(image, 'made');
    // Rewritten as an older build stored it: each chunk's object under its own name, no packs, version 1.
    const manifest = await store.manifest('made');
    for (const hash of chunksOf(manifest)) await store.objects.put(chunkKey(hash), await chunkObject(store, manifest, hash));
    const old = { ...manifest, name: 'old', version: 1, regions: manifest.regions.map(({ places: _places, ...r }) => r) };
    delete (old as Partial<Manifest>).packs;
    await store.objects.put(manifestKey('old'), Buffer.from(JSON.stringify(old)));
    await store.remove('made');
    await store.gc({ graceMs: 0 });
    t.equal(await countObjects(store, 'packs/'), 0, 'no pack left');
    const { dest, report } = await restoreAll(t, store, 'old', new ChunkCache({ dir: tempDir(t) }));
    t.equal(report.digestMatch, true);
    t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(bytes), 'byte for byte');
    dest.close();
    // A child against the old parent: only what differs is uploaded (into a pack); the rest stays the parent's objects.
    const child = Buffer.from(bytes);
    child.fill(0x5a, 0, PAGE);
    const childImage = openImage(t, child);
    const pushed = await store.push(childImage, 'child', { parent: 'old' });
    t.equal(pushed.uploadedChunks, 1);
    const cm = await store.manifest('child');
    t.equal(cm.regions[0].places!.filter((p) => p !== null).length, 1, 'one chunk in a pack, the others the parent’s own objects');
    const again = await restoreAll(t, store, 'child', false);
    t.ok(Buffer.from(again.dest.regions[0].mapping.buffer()).equals(child), 'the child byte for byte');
    again.dest.close();

    // Another image sharing those chunks, pushed by a store whose gc grace is so short that every object found counts as
    // old: the old objects are written again as they were (an empty marker in their place would empty them under 'old').
    const cousin = openImage(t, bytes);
    const refreshed = await store.push(cousin, 'cousin', { graceMs: 0 });
    t.equal(refreshed.presentChunks, 0, 'nothing trusted');
    const cm2 = await store.manifest('cousin');
    t.ok(
      cm2.regions[0].places!.every((p) => p === null),
      'each chunk stays an object of its own',
    );
    for (const hash of chunksOf(cm2)) t.ok((await store.objects.head(chunkKey(hash)))!.size > 0, `the object of ${hash.slice(0, 12)}… still holds its chunk`);
    const oldAgain = await restoreAll(t, store, 'old', false);
    t.ok(Buffer.from(oldAgain.dest.regions[0].mapping.buffer()).equals(bytes), 'the old image still restores byte for byte');
  },
);

t.test('gc beside a push under way: the packs of the parent it counts on are kept, even when the parent is removed meanwhile', async (t) => {
  const store = await storeFor(t);
  const base = imageBytes(1024);
  const a = openImage(t, base);
  await store.push(a, 'base');
  const basePacks = (await store.manifest('base')).packs!;
  // What a child's push writes first as its pending record (seen through the object store's put).
  const child = Buffer.from(base);
  child.fill(0x33, 0, PAGE);
  const b = openImage(t, child);
  const put = store.objects.put.bind(store.objects);
  const pendings: { name: string; body: Uint8Array }[] = [];
  store.objects.put = (name, body, ...rest) => {
    if (name.startsWith('pending/')) pendings.push({ name, body: Buffer.from(body) });
    return put(name, body, ...rest);
  };
  await store.push(b, 'child', { parent: 'base' });
  store.objects.put = put;
  t.equal(pendings.length, 1);
  t.same(JSON.parse(Buffer.from(pendings[0].body).toString()).packs, basePacks, 'the pending record names the parent’s packs');
  // The same push, caught under way: its pending record is there, no manifest names the parent's packs (both removed).
  await store.objects.put(pendings[0].name, pendings[0].body, 'application/json');
  await store.remove('child');
  await store.remove('base');
  // (The child's own pack was made before this record was written again, so here it is older than the push: it goes.)
  const during = await store.gc({ graceMs: 0 });
  t.equal(during.packsDeleted, 1, 'only the child’s own pack, made before the record, is deleted');
  for (const pack of basePacks) t.ok(await store.objects.head(packKey(pack)), 'the parent’s pack is kept while the push is under way');
  await store.objects.delete([pendings[0].name]);
  const after = await store.gc({ graceMs: 0 });
  t.equal(after.packsDeleted, basePacks.length, 'once it is over, nothing names it: deleted');
  t.equal(await countObjects(store, 'packs/'), 0);
});

t.test('with the background on, faults come first: what is fetched ahead is held back while a workload faults, and every page arrives', async (t) => {
  const store = await storeFor(t);
  const pages = 4096;
  const bytes = imageBytes(pages, 5);
  const image = openImage(t, bytes);
  await store.push(image, 'busy');
  const dest = await Destination.connect({ storeImage: { store, name: 'busy' }, cache: false, parallel: 64 });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  const [report] = await Promise.all([dest.finish(), touchPages(r.address, pages, shuffledOrder(pages, 9), { mapping: r })]);
  t.equal(report.digestMatch, true, 'byte for byte');
  const fetched = (dest.session as StoreSession).fetched;
  t.ok(fetched.aheadHeldForFaults > 0, `the background was held back for faults ${fetched.aheadHeldForFaults} times`);
  t.ok(report.faults > 0, `${report.faults} faults served`);
});

t.test('a recorded working set goes from the store as runs of its neighbours in the image: one ranged GET a run, short gaps with it, byte-exact', async (t) => {
  const store = await storeFor(t);
  const pages = 4096;
  const per = DEFAULT_CHUNK_BYTES / PAGE;
  const bytes = randomImage(pages, 0);
  const image = openImage(t, bytes);
  await store.push(image, 'cold');
  // Chunks first touched in this order: {3,4,5}, {10,12} (a gap of one), {20,23} (two), {30} and {34} (a gap of three: apart),
  // and 40..59 (twenty: more than one fetch holds).
  const wide = Array.from({ length: 20 }, (_, i) => 40 + i).filter((c) => c !== 50);
  const touched = [50, 4, 12, 23, 30, 34, 3, 5, 10, 20, ...wide];
  const from = { storeImage: { store, name: 'cold' }, cache: false as const };
  const set = await recordChunks(t, from, pages, touched);
  t.equal(set.entries.length / 8, touched.length, 'one fault a chunk recorded');

  const getsBefore = store.objects.stats.gets;
  const dest = await Destination.connect({ ...from, holdBackground: true, prefetch: set });
  t.teardown(() => dest.close());
  // 3 + 3 + 4 + 1 + 1 + 20 chunks: the gaps of one and two come with their runs, the gap of three does not.
  const chunks = [3, 4, 5, 10, 11, 12, 20, 21, 22, 23, 30, 34, ...Array.from({ length: 20 }, (_, i) => 40 + i)];
  await until('the working set and its gaps', () => dest.stats().pagesInstalledPrefetch === chunks.length * per);
  const fetched = (dest.session as StoreSession).fetched;
  t.equal(fetched.chunks, chunks.length, 'those chunks and no more');
  // One GET for the manifest, one for each run: {3-5}, {10-12}, {20-23}, {30}, {34}, and 40..59 in two (16 chunks a fetch at most).
  t.equal(fetched.store.gets - getsBefore, 1 + 7, 'one ranged GET a run');
  t.equal(fetched.inEngine.pieces, chunks.length, "each run fetched by the engine's own threads");
  // Only those chunks are read here: this thread must never touch a missing page (only it can fetch it).
  chunksAsInImage(t, dest, bytes, chunks);
  dest.session.startBackground();
  t.equal((await dest.finish()).digestMatch, true, 'and the rest, byte for byte');
});

t.test('while faults are served, a working set still goes `parallel` fetches at a time: it is what they wait for next', async (t) => {
  const store = await storeFor(t);
  const pages = 4096;
  const per = DEFAULT_CHUNK_BYTES / PAGE;
  const bytes = randomImage(pages, 3);
  await store.push(openImage(t, bytes), 'busy-set');
  // A set of 32 runs of one chunk, three chunks apart (too far to join): 32 fetches.
  const setChunks = Array.from({ length: 32 }, (_, i) => i * 4);
  const from = { storeImage: { store, name: 'busy-set' }, cache: false as const };
  const set = await recordChunks(t, from, pages, setChunks);
  // Every chunk through the feeder: it sees each fault's piece in flight (the engine's own fetches it hears of once done).
  const dest = await Destination.connect({ ...from, holdBackground: true, prefetch: set, fetchInEngine: false });
  t.teardown(() => dest.close());
  // A workload faulting meanwhile, on chunks outside the set, one after another.
  const r = dest.regions[0].mapping;
  const outside = Array.from({ length: 64 }, (_, i) => 129 + i);
  await touchPages(
    r.address,
    pages,
    Uint32Array.from(outside, (c) => c * per),
    { mapping: r },
  );
  await until('the working set', () => dest.stats().pagesInstalledPrefetch === setChunks.length * per);
  const fetched = (dest.session as StoreSession).fetched;
  // `parallel` is 128 fetches for chunks of 64 KiB (8 MiB in flight): every run of the set at once, not 4 (the background's hold).
  t.equal(fetched.mostSetInFlight, setChunks.length, 'every run of the set in flight at once, not held back by the faults');
  chunksAsInImage(t, dest, bytes, [...setChunks, ...outside]);
  dest.session.startBackground();
  t.equal((await dest.finish()).digestMatch, true, 'and the rest, byte for byte');
});

t.test('a faulted page goes in before the rest of its chunk, and a page of the chunk faulted on meanwhile is never left out', async (t) => {
  const store = await storeFor(t);
  const pages = 2048;
  const per = DEFAULT_CHUNK_BYTES / PAGE;
  const bytes = randomImage(pages, 0);
  const image = openImage(t, bytes);
  await store.push(image, 'middle');
  // Each chunk touched from its middle on, then its start: the faulted page is installed first and wakes the thread, which
  // touches the next page while the rest of the chunk goes in (faulting on it again, if it is not in yet).
  const order: number[] = [];
  for (let c = 0; c < pages / per; c++) {
    for (let i = per / 2; i < per; i++) order.push(c * per + i);
    for (let i = 0; i < per / 2; i++) order.push(c * per + i);
  }
  const { report, session } = await restoreAll(t, store, 'middle', false, Uint32Array.from(order), false);
  t.equal(report.digestMatch, true, 'byte for byte');
  t.equal(session.fetched.chunks, pages / per, 'each chunk fetched once');
});

t.test("a fault's chunk is fetched by the engine itself: checked, installed and kept in the host's cache with no trip through JavaScript", async (t) => {
  const store = await storeFor(t);
  const pages = 1024;
  const bytes = randomImage(pages, 0);
  const image = openImage(t, bytes);
  const pushed = await store.push(image, 'vm');
  const dir = tempDir(t);
  const { report, session } = await restoreAll(t, store, 'vm', new ChunkCache({ dir }), undefined, false);
  t.equal(report.digestMatch, true, 'byte for byte');
  const fetched = session.fetched;
  t.equal(fetched.inEngine.pieces, pushed.uploadedChunks, "every chunk was a fault's, fetched by the engine");
  t.equal(fetched.inEngine.gaveBack, 0, 'none handed to the feeder');
  t.equal(fetched.inEngine.gets, pushed.uploadedChunks, 'one GET a chunk');
  t.equal(fetched.store.bytesFetched - store.objects.stats.bytesFetched, fetched.inEngine.bytesFetched, "the store's figures count the engine's bytes");
  t.ok(fetched.inEngine.keptBytes >= pushed.uploadedChunks * DEFAULT_CHUNK_BYTES, `${fetched.inEngine.keptBytes} bytes kept in the host's cache`);
  // Kept whole and checked: a second restore reads every chunk from the cache and asks the store for its manifest only.
  const gets = store.objects.stats.gets;
  const warm = await restoreAll(t, store, 'vm', new ChunkCache({ dir }), undefined, false);
  t.equal(warm.report.digestMatch, true);
  t.equal(store.objects.stats.gets, gets + 1, 'the warm restore fetched only the manifest');
  t.equal(warm.session.fetched.piecesFromCache, pushed.uploadedChunks, 'the fault thread read every chunk the engine kept');
  // With no host cache, the same (nothing kept); turned off, every chunk goes through the feeder.
  const noCache = await restoreAll(t, store, 'vm', false, undefined, false);
  t.equal(noCache.report.digestMatch, true);
  t.same([noCache.session.fetched.inEngine.pieces, noCache.session.fetched.inEngine.keptBytes], [pushed.uploadedChunks, 0], 'with no cache: fetched, not kept');
  const dest = await Destination.connect({ storeImage: { store, name: 'vm' }, cache: false, background: { enabled: false }, fetchInEngine: false });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  await touchPages(r.address, pages, shuffledOrder(pages, 4), { mapping: r });
  t.equal((await dest.finish()).digestMatch, true);
  const off = (dest.session as StoreSession).fetched;
  t.same([off.inEngine.pieces, off.chunks], [0, pushed.uploadedChunks], 'fetchInEngine: false: all through the feeder');
});

t.test("a chunk another process is fetching is not fetched by the engine: the feeder waits for that fetch's file", async (t) => {
  const store = await storeFor(t);
  const pages = 256;
  const per = DEFAULT_CHUNK_BYTES / PAGE;
  const bytes = randomImage(pages, 0);
  await store.push(openImage(t, bytes), 'vm');
  const manifest = await store.manifest('vm');
  const dir = tempDir(t);
  const cache = new ChunkCache({ dir });
  // Another holder of the first chunk's slot (its own open of the lock file: as another process's).
  const fd = openSync(join(dir, 'lock'), 'r+');
  t.teardown(() => closeSync(fd));
  const held = manifest.regions[0].chunks[0];
  t.equal(native.rangeLock(fd, lockSlotOffset(held), 8, true), true, 'the slot held');
  const dest = await Destination.connect({ storeImage: { store, name: 'vm' }, cache, background: { enabled: false } });
  t.teardown(() => dest.close());
  const session = dest.session as StoreSession;
  const r = dest.regions[0].mapping;
  const touching = touchPages(
    r.address,
    pages,
    Uint32Array.from({ length: per }, (_, i) => i),
    { mapping: r },
  );
  await until('the engine handed the chunk to the feeder', () => session.fetched.inEngine.gaveBack === 1);
  t.equal(session.fetched.chunks, 0, 'nothing fetched while the slot is held');
  // The holder ends without keeping the chunk (it died): the feeder fetches it.
  native.rangeLock(fd, lockSlotOffset(held), 8, false);
  await touching;
  t.equal(Buffer.compare(r.buffer(0, per * PAGE), bytes.subarray(0, per * PAGE)), 0, 'the chunk as in the image');
  t.same([session.fetched.chunks, session.fetched.inEngine.pieces], [1, 0], 'fetched once, by the feeder');
  const rest = touchPages(r.address, pages, shuffledOrder(pages, 5), { mapping: r });
  const [report] = await Promise.all([dest.finish(), rest]);
  t.equal(report.digestMatch, true, 'and the rest by the engine, byte for byte');
  t.equal(session.fetched.inEngine.pieces, pages / per - 1);

  // The same for a group the background takes: a chunk of it held, the whole group goes to the feeder, which waits for that fetch.
  const dir2 = tempDir(t);
  const cache2 = new ChunkCache({ dir: dir2 });
  const fd2 = openSync(join(dir2, 'lock'), 'r+');
  t.teardown(() => closeSync(fd2));
  const middle = manifest.regions[0].chunks[8];
  native.rangeLock(fd2, lockSlotOffset(middle), 8, true);
  const dest2 = await Destination.connect({ storeImage: { store, name: 'vm' }, cache: cache2 });
  t.teardown(() => dest2.close());
  const session2 = dest2.session as StoreSession;
  await until('the group holding the chunk handed to the feeder', () => session2.fetched.inEngine.gaveBack > 0);
  native.rangeLock(fd2, lockSlotOffset(middle), 8, false);
  t.equal((await dest2.finish()).digestMatch, true, 'byte for byte');
  const f2 = session2.fetched;
  t.equal(f2.chunks, pages / per, 'each chunk fetched once');
  t.ok(f2.inEngine.pieces < pages / per, `${f2.inEngine.pieces} by the engine, the held chunk's group by the feeder`);
});

t.test("two faults at once on chunks of the same content: the engine's threads fetch it once (they count the locks they share)", async (t) => {
  const store = await storeFor(t);
  const per = DEFAULT_CHUNK_BYTES / PAGE;
  const one = randomImage(per, 9);
  const bytes = Buffer.concat([one, one, one, one]); // four chunks, one content: stored once, at one place
  await store.push(openImage(t, bytes), 'same');
  const dest = await Destination.connect({ storeImage: { store, name: 'same' }, cache: new ChunkCache({ dir: tempDir(t) }), background: { enabled: false } });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  const gets = (dest.session as StoreSession).fetched.store.gets;
  // Four threads, each faulting on its own chunk, all at once.
  await Promise.all(
    [0, 1, 2, 3].map((c) =>
      touchPages(
        r.address,
        4 * per,
        Uint32Array.from({ length: per }, (_, i) => c * per + i),
        { mapping: r },
      ),
    ),
  );
  t.ok(Buffer.from(r.buffer()).equals(bytes), 'byte for byte');
  const fetched = (dest.session as StoreSession).fetched;
  t.equal(fetched.store.gets - gets, 1, 'one GET for the four');
  t.equal(fetched.cache!.misses, 1, 'the content fetched once; the other pieces read it from the cache');
});

t.test('a damaged chunk a fault needs is refused by the engine too: never installed, handed to the feeder, which names it', async (t) => {
  const store = await storeFor(t);
  const bytes = randomImage(256, 0);
  await store.push(openImage(t, bytes), 'img');
  const manifest = await store.manifest('img');
  const victim = manifest.regions[0].chunks[1];
  const place = placesOf(manifest).get(victim)!;
  const pack = await store.objects.get(packKey(place.pack));
  pack[place.offset + place.length - 1] ^= 0xff;
  await store.objects.put(packKey(place.pack), pack);
  const dest = await Destination.connect({ storeImage: { store, name: 'img' }, cache: false, background: { enabled: false } });
  t.teardown(() => dest.close());
  const failed = new Promise((resolve) => dest.session.once('failed', resolve));
  const r = dest.regions[0].mapping;
  // The damaged chunk's page: the thread waits for ever (the session fails), so it is touched in a child of its own.
  void touchPages(r.address, 256, Uint32Array.of(DEFAULT_CHUNK_BYTES / PAGE), { mapping: r }).catch(() => {});
  t.match(await failed, { code: 'ERR_STORE_CORRUPT', message: new RegExp(victim.slice(0, 16)) }, 'the session fails naming the chunk');
  t.equal((dest.session as StoreSession).fetched.inEngine.gaveBack, 1, 'the engine refused it first');
  t.equal(dest.engine.receivedBitmap(0)[2] & 1, 0, 'none of its pages was installed');
});

t.test("the engine's store fetching checks its arguments: coded errors, nothing started", async (t) => {
  const store = await storeFor(t);
  await store.push(openImage(t, randomImage(64, 0)), 'vm');
  const chunks = (await store.manifest('vm')).regions[0].chunks.length;
  const dest = await Destination.connect({ storeImage: { store, name: 'vm' }, cache: false, fetchInEngine: false });
  t.teardown(() => dest.close());
  const engine = (dest.session as StoreSession).engine;
  const good = {
    address: '127.0.0.1',
    ipv6: false,
    port: 1,
    host: 'h',
    region: 'r',
    keyId: 'k',
    secret: 's',
    token: '',
    packs: [],
    places: [new Uint8Array(24 * chunks)],
    timeoutMs: 1000,
    connections: 1,
  };
  t.throws(() => engine.fetchStoreInEngine({ ...good, port: 0 }), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => engine.fetchStoreInEngine({ ...good, host: 'a\r\nx-evil: 1' }), { code: 'ERR_INVALID_ARG_VALUE' }, 'no header injection');
  t.throws(() => engine.fetchStoreInEngine({ ...good, places: [new Uint8Array(7)] }), { code: 'ERR_INVALID_ARG_TYPE' });
  t.throws(() => engine.fetchStoreInEngine({ ...good, places: [] }), { code: 'ERR_OUT_OF_RANGE', message: /per source region/ });
  t.throws(() => engine.fetchStoreInEngine({ ...good, places: [new Uint8Array(24)] }), { code: 'ERR_OUT_OF_RANGE', message: /per chunk/ });
  t.throws(() => engine.fetchStoreInEngine({ ...good, packs: ['no-slash'] }), { code: 'ERR_INVALID_ARG_VALUE' });
  const pastPacks = new Uint8Array(24 * chunks);
  new DataView(pastPacks.buffer).setBigInt64(0, 5n, true);
  t.throws(() => engine.fetchStoreInEngine({ ...good, places: [pastPacks] }), { code: 'ERR_OUT_OF_RANGE', message: /pack out of range/ });
  t.equal(engine.storeInEngine.gets, 0, 'nothing fetched');
  t.equal((await dest.finish()).digestMatch, true, 'the feeder restores it all');
});

t.test('a child pushed with its parent uploads only the chunks that differ; both restore', async (t) => {
  const store = await storeFor(t);
  const base = imageBytes(4096);
  const child = Buffer.from(base);
  for (const p of [10, 11, 1000, 3000]) child.fill(0x5a, p * PAGE, (p + 1) * PAGE); // 3 chunks touched
  const baseImage = openImage(t, base);
  const childImage = openImage(t, child);
  const first = await store.push(baseImage, 'base');
  const second = await store.push(childImage, 'child', { parent: 'base' });
  t.equal(second.uploadedChunks, 3, 'three chunks differ');
  t.ok(second.uploadedRatio < 0.15, `uploaded ${second.uploadedBytes} bytes of ${second.bytes} (${second.uploadedRatio})`);
  t.equal(second.presentChunks, second.chunks - second.zeroChunks - second.repeatedChunks - 3, 'the rest were the parent’s');
  t.equal(first.uploadedChunks, second.presentChunks + 3, 'the parent had them all');
  const again = await store.push(childImage, 'child-again');
  t.equal(again.uploadedChunks, 0, 'pushed again under another name: nothing to upload');
  const listed = await store.list();
  t.same(
    listed.map((e) => [e.name, e.parent]),
    [
      ['base', null],
      ['child', 'base'],
      ['child-again', null],
    ],
  );
  const { dest } = await restoreAll(t, store, 'child', false);
  t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(child), 'the child byte for byte');
});

t.test('rm refuses a parent; gc deletes only chunks and packs no image names (and none younger than the grace)', async (t) => {
  const store = await storeFor(t);
  const base = imageBytes(1024);
  const child = Buffer.from(base);
  child.fill(0x77, 0, PAGE);
  const a = openImage(t, base);
  const b = openImage(t, child);
  await store.push(a, 'base');
  await store.push(b, 'child', { parent: 'base' });
  await t.rejects(store.remove('base'), { code: 'ERR_STORE_CONFLICT', message: /parent of child/ });
  await store.remove('child');
  const young = await store.gc();
  t.equal(young.deleted, 0, 'the child’s own chunk is younger than the grace: kept');
  t.equal(young.packsDeleted, 0, 'and so is its pack');
  t.equal(young.packs, 2, 'the base’s pack and the child’s');
  const collected = await store.gc({ graceMs: 0 });
  t.equal(collected.deleted, 1, 'the chunk only the child named is deleted');
  t.equal(collected.kept, collected.chunks - 1);
  t.equal(collected.packsDeleted, 1, 'the pack only the child named is deleted');
  t.equal(collected.packBytesUnneeded, 0, 'every byte of the base’s pack is a chunk the base names');
  const { dest } = await restoreAll(t, store, 'base', false);
  t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(base), 'the parent still restores byte for byte');
  await t.rejects(store.manifest('child'), { code: 'ERR_STORE_NOT_FOUND', message: /no image "child"/ });
});

t.test('gc: a pack that one image still needs part of is kept whole, and the bytes no image needs are reported', async (t) => {
  const store = await storeFor(t);
  const base = randomImage(1024, 0);
  const half = Buffer.from(base);
  half.fill(0, half.length / 2); // the first half of the base's chunks, then zeros
  const a = openImage(t, base);
  const b = openImage(t, half);
  await store.push(a, 'whole');
  const pushed = await store.push(b, 'half'); // no parent: its chunks found by their markers, in the whole image's pack
  t.equal(pushed.uploadedChunks, 0);
  await store.remove('whole');
  const collected = await store.gc({ graceMs: 0 });
  t.equal(collected.packsDeleted, 0, 'the pack is kept: half of it is needed');
  const m = await store.manifest('half');
  const pack = m.packs![0];
  const size = (await store.objects.head(packKey(pack)))!.size;
  const neededBytes = [...placesOf(m).values()].reduce((n, p) => n + p.length, 0);
  t.ok(neededBytes > 0 && neededBytes < size, `the image needs ${neededBytes} of the pack's ${size} bytes`);
  t.equal(collected.packBytesUnneeded, size - neededBytes, `${size - neededBytes} of the pack's ${size} bytes hold no image's chunk`);
  const { dest } = await restoreAll(t, store, 'half', false);
  t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(half), 'the image that needs it still restores byte for byte');
});

t.test('a damaged chunk is never installed, and a missing one is named', async (t) => {
  const store = await storeFor(t);
  const bytes = imageBytes(512);
  const image = openImage(t, bytes);
  await store.push(image, 'img');
  const manifest = await store.manifest('img');
  const victim = manifest.regions[0].chunks.find((c) => c !== '')!;
  const place = placesOf(manifest).get(victim)!;
  const pack = await store.objects.get(packKey(place.pack));
  pack[place.offset + place.length - 1] ^= 0xff; // one bit of the chunk's stored bytes flipped
  await store.objects.put(packKey(place.pack), pack);
  const dest = await Destination.connect({ storeImage: { store, name: 'img' }, cache: false });
  t.teardown(() => dest.close());
  const failed = new Promise((resolve) => dest.session.once('failed', resolve));
  t.match(await failed, { code: 'ERR_STORE_CORRUPT', message: new RegExp(victim.slice(0, 16)) }, 'the session fails naming the chunk');
  t.equal(dest.engine.receivedBitmap(0)[0] & 1, 0, 'its first page was never installed');

  await store.objects.delete([packKey(place.pack)]);
  const dest2 = await Destination.connect({ storeImage: { store, name: 'img' }, cache: false });
  t.teardown(() => dest2.close());
  const failed2 = await new Promise((resolve) => dest2.session.once('failed', resolve));
  t.match(failed2, { code: 'ERR_STORE_NOT_FOUND', message: new RegExp(`its pack ${place.pack.slice(0, 16)}`) }, 'a missing pack is named');
  await t.rejects(Destination.connect({ storeImage: { store, name: 'nothing' } }), { code: 'ERR_STORE_NOT_FOUND', message: /no image "nothing"/ });
  // A place past its pack's end (a manifest damaged, or forged): damage, named, never an outage retried until give-up.
  const pastEnd = structuredClone(manifest);
  pastEnd.name = 'past-end';
  pastEnd.regions[0].places = pastEnd.regions[0].places!.map((p) => (p ? [p[0], p[1] + (1 << 30), p[2]] : null));
  await store.objects.put(manifestKey('past-end'), Buffer.from(JSON.stringify(pastEnd)));
  await store.objects.put(packKey(place.pack), pack); // the pack back (its flipped bit is never reached: every range is past its end)
  const dest3 = await Destination.connect({ storeImage: { store, name: 'past-end' }, cache: false });
  t.teardown(() => dest3.close());
  const failed3 = await new Promise((resolve) => dest3.session.once('failed', resolve));
  t.match(failed3, { code: 'ERR_STORE_CORRUPT', message: /no such byte range/ });
  await store.objects.put(manifestKey('broken'), Buffer.from('{"format":"uffd-postcopy image","version":9}'));
  await t.rejects(Destination.connect({ storeImage: { store, name: 'broken' } }), { code: 'ERR_STORE_CORRUPT', message: /version 9/ });
});

t.test('the host cache: a second restore of the image fetches nothing from the store, and a damaged cached chunk is fetched again', async (t) => {
  const store = await storeFor(t);
  const bytes = imageBytes(1024);
  const image = openImage(t, bytes);
  const pushed = await store.push(image, 'img');
  const dir = tempDir(t);
  const cold = await restoreAll(t, store, 'img', new ChunkCache({ dir }));
  t.equal(cold.session.fetched.cache?.misses, pushed.uploadedChunks);
  const gets = store.objects.stats.gets;
  const warm = await restoreAll(t, store, 'img', new ChunkCache({ dir }));
  t.equal(store.objects.stats.gets, gets + 1, 'only the manifest was fetched');
  const { cache: warmCache, piecesFromCache } = warm.session.fetched;
  t.equal(warmCache!.hits + piecesFromCache, pushed.uploadedChunks, 'every chunk came from the cache');
  t.ok(piecesFromCache > 0, `the engine read ${piecesFromCache} of them itself`);
  t.ok(Buffer.from(warm.dest.regions[0].mapping.buffer()).equals(bytes));
  // A cached chunk damaged on disk (a bit flipped): checked on read, removed, fetched again.
  const manifest = await store.manifest('img');
  const victim = manifest.regions[0].chunks.find((c) => c !== '')!;
  const path = join(dir, victim.slice(0, 2), victim);
  const kept = readFileSync(path);
  kept[100] ^= 1;
  writeFileSync(path, kept);
  const third = await restoreAll(t, store, 'img', new ChunkCache({ dir }));
  t.equal(third.session.fetched.cache?.damaged, 1, 'the damaged chunk was noticed');
  t.ok(Buffer.from(third.dest.regions[0].mapping.buffer()).equals(bytes), 'and the restore is byte-exact');
  // With no background, every piece is a fault's: the fault thread reads the cache itself, JavaScript never sees one.
  const faulted = await restoreAll(t, store, 'img', new ChunkCache({ dir }), undefined, false);
  t.equal(faulted.session.fetched.piecesFromCache, pushed.uploadedChunks, 'the fault thread read every chunk from the cache');
  t.equal(faulted.session.fetched.pieces, 0, 'none went through JavaScript');
  t.ok(Buffer.from(faulted.dest.regions[0].mapping.buffer()).equals(bytes), 'byte-exact');
  // A cached file damaged again: the fault thread will not install it; it is fetched again and replaced.
  writeFileSync(path, kept);
  const refetched = await restoreAll(t, store, 'img', new ChunkCache({ dir }), undefined, false);
  t.equal(refetched.session.fetched.piecesFromCache, pushed.uploadedChunks - 1, 'every other chunk from the fault thread');
  t.equal(refetched.session.fetched.cache?.damaged, 1, 'the damaged one noticed');
  t.ok(Buffer.from(refetched.dest.regions[0].mapping.buffer()).equals(bytes), 'byte-exact');
});

t.test('CLI: store push, then two restores at once on one host share the chunk cache: each chunk comes from the store once', async (t) => {
  const bucket = await freshBucket(t);
  const dir = tempDir(t);
  const first = imageBytes(3000);
  const second = randomImage(64, 3);
  writeFileSync(join(dir, 'a.mem'), first);
  writeFileSync(join(dir, 'b.mem'), second);
  const pushed = await runCli(['store', 'push', join(dir, 'a.mem'), join(dir, 'b.mem'), '--to', `${bucket}/fleet`, '--name', 'vm', '--json']);
  t.equal(pushed.code, 0, pushed.stderr);
  const report = JSON.parse(pushed.stdout);
  t.equal(report.uploadedChunks, report.chunks - report.zeroChunks - report.repeatedChunks);
  const listed = await runCli(['store', 'ls', `${bucket}/fleet`, '--json']);
  t.same(
    JSON.parse(listed.stdout).map((e: { name: string; bytes: number }) => [e.name, e.bytes]),
    [['vm', first.length + second.length]],
  );
  const cache = join(dir, 'cache');
  const restores = [1, 2].map((i) =>
    runCli(['restore', '--image', `${bucket}/fleet/vm`, '--cache-dir', cache, '--out', join(dir, `out${i}.mem`), '--json', '--seed', String(i)]),
  );
  const results = await Promise.all(restores);
  for (const r of results) t.equal(r.code, 0, r.stderr);
  const reports = results.map((r) => JSON.parse(r.stdout));
  for (const r of reports) t.equal(r.digestMatch, true);
  const wanted = Buffer.concat([first, second]);
  for (const i of [1, 2]) t.ok(readFileSync(join(dir, `out${i}.mem`)).equals(wanted), `restore ${i} wrote the image byte for byte`);
  const fetched = reports.reduce((n, r) => n + r.source.cache.misses, 0);
  t.equal(fetched, report.uploadedChunks, `the two restores fetched ${fetched} chunks from the store: each stored chunk once`);
  const gets = reports.reduce((n, r) => n + r.source.store.gets, 0);
  t.ok(gets <= report.uploadedChunks + 2, `GETs: ${gets}, at most the chunks once (neighbours in a pack share one) and each restore its manifest`);
});

t.test('CLI: store mistakes are refused in one line', async (t) => {
  const cases: [string[], RegExp][] = [
    [['restore', '--image', 'vm.mem', '--cache-dir', '/tmp/x'], /--cache-dir is for an image in a store/],
    [['restore', '--image', 's3://Bad_Bucket/x'], /not a bucket name/],
    [['restore', '--image', 's3://bucket/p/vm', '--image', 'other.mem'], /one --image s3:/],
    [['store', 'push', '--to', 's3://bucket', '--name', 'x'], /give the image file/],
    [['store', 'push', 'a.mem', '--to', 's3://bucket', '--name', 'no/slash'], /not an image name/],
    [['store', 'gc'], /give one store address/],
    [['store', 'frob'], /takes push, ls, rm or gc/],
  ];
  for (const [args, message] of cases) {
    const r = await runCli(args);
    t.equal(r.code, 2, args.join(' '));
    t.match(r.stderr, message);
    t.match(r.stderr, /ERR_USAGE/);
  }
});

t.test('the store killed mid-restore (its gateway, -9) and started again: a pause, then every page, byte-exact', async (t) => {
  const gateway = await ownGateway(t);
  const bucket = await freshBucket(t);
  const store = new SnapshotStore(parseStoreUrl(`${bucket}/x`), { endpoint: gateway.endpoint, maxAttempts: 2, requestTimeoutMs: 2000 });
  t.teardown(() => store.close());
  const bytes = imageBytes(2048);
  const image = openImage(t, bytes);
  await store.push(image, 'vm');
  const dest = await Destination.connect({
    storeImage: { store, name: 'vm' },
    cache: false,
    background: { enabled: false },
    recovery: { retryDelayMs: { initial: 50, max: 400 } },
  });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  const half = (from: number) => Uint32Array.from({ length: 1024 }, (_, i) => from + i);
  await touchPages(r.address, 2048, half(0), { mapping: r });
  gateway.kill();
  const paused = once(dest.session, 'paused');
  const rest = touchPages(r.address, 2048, half(1024), { mapping: r });
  const [why] = await paused;
  t.match(why, { code: 'ERR_STORE_UNREACHABLE' }, 'a fault with the store gone pauses the session');
  t.equal(dest.status().state, 'paused');
  await gateway.start();
  const [report] = await Promise.all([dest.finish(), rest]);
  t.equal(report.digestMatch, true);
  t.ok(Buffer.from(r.buffer()).equals(bytes), 'byte for byte');
  t.equal(dest.status().resumes, 1, 'one outage, resumed');
  t.ok(dest.status().pausedMs > 0);
  const fetched = (dest.session as StoreSession).fetched;
  t.ok(fetched.inEngine.gaveBack >= 1, `the engine handed ${fetched.inEngine.gaveBack} faults' chunks to the feeder, which waited out the outage`);
});

t.test('with a give-up time, a store that stays gone fails the session (ERR_SOURCE_LOST), never a hang', async (t) => {
  const gateway = await ownGateway(t);
  const bucket = await freshBucket(t);
  const store = new SnapshotStore(parseStoreUrl(`${bucket}/x`), { endpoint: gateway.endpoint, maxAttempts: 1, requestTimeoutMs: 1000 });
  t.teardown(() => store.close());
  const image = openImage(t, imageBytes(512));
  await store.push(image, 'vm');
  const dest = await Destination.connect({
    storeImage: { store, name: 'vm' },
    cache: false,
    background: { enabled: false },
    recovery: { retryDelayMs: { initial: 50, max: 200 }, giveUpAfterMs: 1500 },
  });
  t.teardown(() => dest.close());
  gateway.kill();
  const failed = once(dest.session, 'failed');
  const r = dest.regions[0].mapping;
  const touching = touchPages(r.address, 512, Uint32Array.from([0, 300]), { mapping: r }).catch(() => null);
  const [err] = await failed;
  t.match(err, { code: 'ERR_SOURCE_LOST', message: /store stayed out of reach for 1500 ms/, details: { cause: 'ERR_STORE_UNREACHABLE' } });
  await touching; // the waiting thread is released (the restore's memory reads zeros once given up)
  await t.rejects(dest.finish(), { code: 'ERR_SOURCE_LOST' });
});

t.test('CLI: handle --image s3://... serves a VMM (the fixture, Firecracker handshake) from the store: byte-exact from four threads', async (t) => {
  const bucket = await freshBucket(t);
  const dir = tempDir(t);
  const bytes = imageBytes(2048);
  const imagePath = join(dir, 'vm.mem');
  writeFileSync(imagePath, bytes);
  const pushed = await runCli(['store', 'push', imagePath, '--to', `${bucket}/vms`, '--name', 'vm']);
  t.equal(pushed.code, 0, pushed.stderr);
  const socket = join(dir, 'handler.sock');
  const handler = spawnCli(t, ['handle', '--socket', socket, '--image', `${bucket}/vms/vm`, '--cache-dir', join(dir, 'cache'), '--single-process']);
  await until('the handler to listen', () => existsSync(socket) || handler.child.exitCode !== null);
  t.equal(handler.child.exitCode, null, handler.output().stderr);
  const vmm = spawn(buildFixture('vmm'), ['--socket', socket, '--image', imagePath, '--threads', '4', '--order', 'random'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  vmm.stdout.on('data', (d) => (out += d));
  const [code] = await once(vmm, 'close');
  t.equal(code, 0, 'the VMM verified every byte');
  t.match(JSON.parse(out.trim()), { ok: true, pages: 2048, mismatchedPages: 0 });
  const summary = await until('the session summary', () =>
    handler
      .output()
      .stdout.split('\n')
      .find((l) => l.includes('"complete"')),
  );
  t.match(JSON.parse(summary), { complete: true, bytesReceived: 0, recovery: { session: 'store' } });
  const missing = await runCli(['handle', '--socket', join(dir, 'other.sock'), '--image', `${bucket}/vms/nothing`]);
  t.equal(missing.code, 1, 'an image the store does not hold: refused at start');
  t.match(missing.stderr, /ERR_STORE_NOT_FOUND/);
});

t.test('CLI: serve --image s3://... serves an image of the store to a destination that has no store credentials', async (t) => {
  const bucket = await freshBucket(t);
  const dir = tempDir(t);
  const bytes = imageBytes(1024);
  writeFileSync(join(dir, 'vm.mem'), bytes);
  const pushed = await runCli(['store', 'push', join(dir, 'vm.mem'), '--to', `${bucket}/vms`, '--name', 'vm']);
  t.equal(pushed.code, 0, pushed.stderr);
  const { listening } = await startServeCli(t, ['--image', `${bucket}/vms/vm`, '--listen', `unix:${join(dir, 's.sock')}`, '--cache-dir', join(dir, 'cache')]);
  // The destination knows nothing of the store: no AWS variables at all.
  const bare = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('AWS_'))) as Record<string, string>;
  const [cmd, ...pre] = cliCommand();
  const restore = spawn(cmd, [...pre, 'restore', '--source', `unix:${listening.path}`, '--out', join(dir, 'out.mem'), '--json'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: bare,
  });
  let out = '';
  restore.stdout.on('data', (d) => (out += d));
  const [code] = await once(restore, 'close');
  t.equal(code, 0);
  t.equal(JSON.parse(out.trim()).digestMatch, true);
  t.ok(readFileSync(join(dir, 'out.mem')).equals(bytes), 'byte for byte');
  const refused = await runCli(['serve', '--image', `${bucket}/vms/vm`, '--listen', `unix:${join(dir, 't.sock')}`, '--release-as-sent']);
  t.equal(refused.code, 2);
  t.match(refused.stderr, /an image in a store stays in the store/);
});

t.test('tenants: sealed chunks and manifests the store cannot read; a tenant deduplicates with itself, never with another', async (t) => {
  const bucket = await freshBucket(t);
  const dir = tempDir(t);
  const bytes = imageBytes(1024);
  const marker = Buffer.from('a plaintext marker the store must never see');
  for (let p = 0; p < 1024; p += 8) marker.copy(bytes, p * PAGE + 100);
  writeFileSync(join(dir, 'vm.mem'), bytes);
  writeFileSync(join(dir, 'a.key'), 'tenant A secret: 0123456789abcdef\n');
  writeFileSync(join(dir, 'b.key'), 'tenant B secret: fedcba9876543210\n');
  const push = (name: string, key: string, prefix = 'shared') =>
    runCli(['store', 'push', join(dir, 'vm.mem'), '--to', `${bucket}/${prefix}`, '--name', name, '--tenant-key-file', join(dir, key), '--json']);
  const a1 = await push('a1', 'a.key');
  t.equal(a1.code, 0, a1.stderr);
  const first = JSON.parse(a1.stdout);
  t.ok(first.uploadedChunks > 0);
  const a2 = JSON.parse((await push('a2', 'a.key')).stdout);
  t.equal(a2.uploadedChunks, 0, 'the same tenant, the same content: nothing uploaded again');
  const b1 = JSON.parse((await push('b1', 'b.key')).stdout);
  t.equal(b1.uploadedChunks, first.uploadedChunks, 'another tenant: its own chunks (no dedup across tenants)');

  // What the store holds: no object named by a content hash, no plaintext, no readable manifest.
  const objects = new SnapshotStore(parseStoreUrl(`${bucket}/shared`)).objects;
  t.teardown(() => objects.close());
  const manifest = (await new SnapshotStore(parseStoreUrl(`${bucket}/shared`), { tenant: TenantKey.fromFile(join(dir, 'a.key')) }).manifest('a1')).regions[0];
  const names: string[] = [];
  for await (const o of objects.list('')) names.push(o.key);
  for (const hash of manifest.chunks.filter((c) => c))
    t.notOk(
      names.some((n) => n.endsWith(hash)),
      `no object is named ${hash.slice(0, 12)}…`,
    );
  let sawMarker = false;
  for (const name of names) if ((await objects.get(name)).includes(marker)) sawMarker = true;
  t.notOk(sawMarker, 'no object holds the plaintext marker');

  // Restores: byte-exact with the key; refused without it, or with another tenant's.
  const out = join(dir, 'out.mem');
  const ok = await runCli(['restore', '--image', `${bucket}/shared/a1`, '--tenant-key-file', join(dir, 'a.key'), '--out', out, '--json']);
  t.equal(ok.code, 0, ok.stderr);
  t.ok(readFileSync(out).equals(bytes), 'restored with the key: byte for byte');
  const none = await runCli(['restore', '--image', `${bucket}/shared/a1`]);
  t.equal(none.code, 1);
  t.match(none.stderr, /ERR_STORE_DENIED/);
  t.match(none.stderr, /tenant-key-file/);
  const other = await runCli(['restore', '--image', `${bucket}/shared/a1`, '--tenant-key-file', join(dir, 'b.key')]);
  t.equal(other.code, 1);
  t.match(other.stderr, /this tenant key does not open it/);
  // gc with one tenant's key refuses a prefix holding another's manifests (it cannot tell what they name).
  const gc = await runCli(['store', 'gc', `${bucket}/shared`, '--tenant-key-file', join(dir, 'a.key')]);
  t.equal(gc.code, 1);
  t.match(gc.stderr, /ERR_STORE_DENIED/);
});
