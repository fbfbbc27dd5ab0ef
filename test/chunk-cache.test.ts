// The host's chunk cache on its own (lib/store/chunk-cache.ts, no store
// needed): its file layout (content and a checked footer, addon/chunk_cache.h),
// what it does with a file that fails the check, and that a cache holding
// many chunks is counted once however many chunks are kept at once.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import * as fsPromises from 'node:fs/promises';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ChunkCache } from '../lib/store/chunk-cache.js';
import { chunkHash } from '../lib/store/chunk.js';
import { native } from '../lib/native.js';
import { tempDir, until } from './helpers.js';

t.test('a kept chunk is its content and a footer: the magic and the check of the content, which a read verifies', async (t) => {
  const dir = tempDir(t);
  const cache = new ChunkCache({ dir });
  const content = randomBytes(65536 + 100); // any length: files kept with an image are not whole pages
  const hash = chunkHash(content);
  const got = await cache.get(hash, async () => content);
  t.ok(got.equals(content));
  await cache.settled();
  const file = readFileSync(join(dir, hash.slice(0, 2), hash));
  t.equal(file.length, content.length + 16);
  t.ok(file.subarray(0, content.length).equals(content), 'the content, decompressed');
  t.equal(file.subarray(content.length, content.length + 8).toString(), 'uffdpcc1');
  t.equal(file.readBigUInt64LE(content.length + 8), native.cacheCheck(content));
  t.not(native.cacheCheck(content), native.cacheCheck(Buffer.concat([content.subarray(0, 10), Buffer.from([content[10] ^ 1]), content.subarray(11)])));

  const again = new ChunkCache({ dir });
  t.ok((await again.get(hash, async () => t.fail('fetched again') as never)).equals(content), 'read back without a fetch');
  t.equal(again.stats.hits, 1);
});

t.test('a file that fails its check (a flipped bit, or no footer: an older layout) is removed and fetched again', async (t) => {
  const dir = tempDir(t);
  const contents = [randomBytes(8192), randomBytes(8192)];
  const hashes = contents.map((c) => chunkHash(c));
  for (const h of hashes) mkdirSync(join(dir, h.slice(0, 2)), { recursive: true });
  const first = new ChunkCache({ dir });
  await first.get(hashes[0], async () => contents[0]);
  await first.settled();
  const path0 = join(dir, hashes[0].slice(0, 2), hashes[0]);
  const damaged = readFileSync(path0);
  damaged[5] ^= 1;
  writeFileSync(path0, damaged);
  writeFileSync(join(dir, hashes[1].slice(0, 2), hashes[1]), contents[1]); // the layout before the footer
  const cache = new ChunkCache({ dir });
  let fetches = 0;
  for (const [i, h] of hashes.entries()) {
    const got = await cache.get(h, async () => {
      fetches++;
      return contents[i];
    });
    t.ok(got.equals(contents[i]));
  }
  t.equal(fetches, 2, 'both fetched again');
  t.equal(cache.stats.damaged, 2);
  await cache.settled();
  t.equal(readFileSync(path0).length, 8192 + 16, 'and kept again, whole');
});

t.test('many chunks kept at once into a full directory: it is counted once, not once per chunk', async (t) => {
  const dir = tempDir(t);
  // A cache that holds many chunks already.
  for (let i = 0; i < 256; i++) {
    const sub = join(dir, i.toString(16).padStart(2, '0'));
    mkdirSync(sub, { recursive: true });
    for (let k = 0; k < 8; k++) writeFileSync(join(sub, `${i}-${k}`), 'x');
  }
  let scans = 0;
  const { ChunkCache: Counted } = await t.mockImport<typeof import('../lib/store/chunk-cache.js')>('../lib/store/chunk-cache.js', {
    'node:fs/promises': {
      ...fsPromises,
      readdir: (async (path: string, ...rest: unknown[]) => {
        if (path === dir) scans++;
        return (fsPromises.readdir as (...a: unknown[]) => Promise<string[]>)(path, ...rest);
      }) as typeof fsPromises.readdir,
    },
  });
  const cache = new Counted({ dir });
  const contents = Array.from({ length: 64 }, () => randomBytes(4096));
  await Promise.all(contents.map((c) => cache.get(chunkHash(c), async () => c)));
  await cache.settled();
  t.equal(scans, 1, 'one scan of the directory for 64 chunks kept at once');
});

t.test('a lock is a lease: a long fetch is waited for while its holder touches the lock; a lock left untouched is taken over', async (t) => {
  const dir = tempDir(t);
  const content = randomBytes(4096);
  const hash = chunkHash(content);
  const lock = join(dir, 'locks', hash);
  // A fetch here that takes long: the holder touches its lock meanwhile.
  let answer!: (b: Buffer) => void;
  const holder = new ChunkCache({ dir });
  const held = holder.get(hash, () => new Promise<Buffer>((resolve) => (answer = resolve)));
  await until('the lock is taken', () => existsSync(lock) || undefined, 5000);
  const first = statSync(lock).mtimeMs;
  await until('the holder touches its lock', () => statSync(lock).mtimeMs > first || undefined, 10_000);
  // Another cache (as another process would) waits for it rather than fetching again.
  const waiter = new ChunkCache({ dir });
  let fetchedTwice = false;
  const waited = waiter.get(hash, async () => {
    fetchedTwice = true;
    return content;
  });
  answer(content);
  t.ok((await held).equals(content));
  t.ok((await waited).equals(content));
  t.notOk(fetchedTwice, 'fetched once');
  t.equal(waiter.stats.joined, 1);
  await holder.settled();

  // A lock a live process holds but has not touched for 20 s (it hung): taken over, fetched here.
  const other = randomBytes(4096);
  const otherHash = chunkHash(other);
  const sleeper = spawn('sleep', ['30']);
  t.teardown(() => sleeper.kill());
  const stuck = join(dir, 'locks', otherHash);
  writeFileSync(stuck, String(sleeper.pid));
  const past = new Date(Date.now() - 20_000);
  utimesSync(stuck, past, past);
  const taker = new ChunkCache({ dir });
  t.ok((await taker.get(otherHash, async () => other)).equals(other));
  t.equal(taker.stats.misses, 1, 'fetched by the one that took the lock over');
  await taker.settled();
});
