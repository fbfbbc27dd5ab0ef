// The host's chunk cache on its own (lib/store/chunk-cache.ts, no store
// needed): its file layout (content and a checked footer, addon/chunk_cache.h),
// what it does with a file that fails the check, and that a cache holding
// many chunks is counted once however many chunks are kept at once.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import * as fsPromises from 'node:fs/promises';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ChunkCache, lockSlotOffset } from '../lib/store/chunk-cache.js';
import { projectRoot } from '../lib/package-root.js';
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

t.test(
  'a chunk file is made whole before it has a name: no temporary file is left, a folder removed meanwhile is made again, a crash leftover is swept',
  async (t) => {
    const dir = tempDir(t);
    const cache = new ChunkCache({ dir });
    const contents = Array.from({ length: 3 }, () => randomBytes(16384));
    const hashes = contents.map((c) => chunkHash(c));
    await cache.get(hashes[0], async () => contents[0]);
    await cache.settled();
    const folder = join(dir, hashes[0].slice(0, 2));
    t.same(readdirSync(folder), [hashes[0]], 'only the chunk, under its name: nothing temporary beside it');
    t.same(readdirSync(dir).sort(), [hashes[0].slice(0, 2), 'lock'].sort(), 'no folder of temporary files');

    // A folder removed under a running cache (a cleaner): the next chunk into it makes it again.
    rmSync(folder, { recursive: true });
    const sameFolder = randomBytes(16384);
    let h = chunkHash(sameFolder);
    for (let i = 0; h.slice(0, 2) !== hashes[0].slice(0, 2); i++) {
      sameFolder.writeUInt32LE(i);
      h = chunkHash(sameFolder);
    }
    await cache.get(h, async () => sameFolder);
    await cache.settled();
    t.ok(readFileSync(join(folder, h)).subarray(0, sameFolder.length).equals(sameFolder), 'kept in the folder made again');

    // What a writer on a filesystem without nameless files left when it crashed: removed by the next scan once old, never
    // counted or read as a chunk; one being written now is left alone.
    const old = join(folder, `.tmp.${hashes[1]}.1.1`);
    const fresh = join(folder, `.tmp.${hashes[2]}.1.2`);
    writeFileSync(old, randomBytes(5000));
    writeFileSync(fresh, randomBytes(7000));
    const longAgo = new Date(Date.now() - 3600_000);
    utimesSync(old, longAgo, longAgo);
    t.equal(await cache.size(), sameFolder.length + 16, 'only chunk files count');
    t.notOk(existsSync(old), 'the crash leftover is removed');
    t.ok(existsSync(fresh), 'a file being written is left alone');
  },
);

t.test("the native write of a chunk file checks its arguments and reports the kernel's errors as Node does", async (t) => {
  const dir = tempDir(t);
  const content = randomBytes(4096);
  t.throws(() => native.cacheKeep(dir, '../escape', content, 1n), { code: 'ERR_INVALID_ARG_VALUE' });
  t.throws(() => native.cacheKeep(dir, '.hidden', content, 1n), { code: 'ERR_INVALID_ARG_VALUE' });
  t.throws(() => native.cacheKeep(dir, 'x', 'not bytes' as unknown as Uint8Array, 1n), { code: 'ERR_INVALID_ARG_TYPE' });
  t.throws(() => native.cacheKeep(dir, 'x', content, -1n), { code: 'ERR_OUT_OF_RANGE' });
  t.equal(await native.cacheKeep(join(dir, 'ab'), 'x', content, native.cacheCheck(content)), true, 'made');
  t.equal(await native.cacheKeep(join(dir, 'ab'), 'x', content, native.cacheCheck(content)), false, 'one of that name was there: left as it is');
  writeFileSync(join(dir, 'file'), 'not a folder');
  await t.rejects(native.cacheKeep(join(dir, 'file'), 'x', content, 1n), { code: 'ENOTDIR', errno: -20, syscall: 'open' });
  await t.rejects(native.cacheKeep(join(dir, 'gone', 'ab'), 'x', content, 1n), { code: 'ENOENT', syscall: 'mkdir' });
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

/**
 * Another process holding a chunk's lock, as a fetching cache would: it locks
 * the chunk's slot in the cache's lock file and writes a beat; `stale` writes
 * one 20 s old and never beats again (a holder that hung). It prints "locked",
 * then, on a line "keep" on its stdin, writes the chunk's file as a cache does
 * and lets go.
 */
function otherHolder(dir: string, hash: string, content: Buffer, stale: boolean) {
  const script = `
    const { createRequire } = require('node:module');
    const fs = require('node:fs');
    const native = createRequire(${JSON.stringify(join(projectRoot(), 'package.json'))})('#addon');
    const fd = fs.openSync(${JSON.stringify(join(dir, 'lock'))}, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    const at = ${lockSlotOffset(hash)};
    if (!native.rangeLock(fd, at, 8, true)) { console.log('busy'); process.exit(1); }
    const beat = Buffer.alloc(8);
    beat.writeDoubleLE(Date.now() - (${stale} ? 20000 : 0));
    fs.writeSync(fd, beat, 0, 8, at);
    console.log('locked');
    process.stdin.on('data', () => {
      const content = Buffer.from(${JSON.stringify(content.toString('base64'))}, 'base64');
      const footer = Buffer.alloc(16);
      footer.write('uffdpcc1');
      footer.writeBigUInt64LE(native.cacheCheck(content), 8);
      fs.mkdirSync(${JSON.stringify(join(dir, hash.slice(0, 2)))}, { recursive: true });
      fs.writeFileSync(${JSON.stringify(join(dir, hash.slice(0, 2), hash))}, Buffer.concat([content, footer]));
      native.rangeLock(fd, at, 8, false);
      console.log('kept');
    });
  `;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  return { child, said: (word: string) => until(`the other process to say ${word}`, () => out.includes(word) || undefined, 10_000) };
}

t.test('a lock is a lease: another process fetching a chunk is waited for, not fetched again; one that hung or died is not waited for', async (t) => {
  const dir = tempDir(t);
  new ChunkCache({ dir }); // makes the directory and its lock file
  const fetchHere = (content: Buffer, counter: { n: number }) => async () => {
    counter.n++;
    return content;
  };

  // A live holder: this process waits for its file and fetches nothing.
  const content = randomBytes(4096);
  const hash = chunkHash(content);
  const live = otherHolder(dir, hash, content, false);
  t.teardown(() => live.child.kill('SIGKILL'));
  await live.said('locked');
  const waiter = new ChunkCache({ dir });
  const fetched = { n: 0 };
  const waited = waiter.get(hash, fetchHere(content, fetched));
  await new Promise((r) => setTimeout(r, 300)); // (a wait that must not end in a fetch: any length shows it)
  t.equal(fetched.n, 0, 'nothing fetched while the other process holds the chunk');
  live.child.stdin!.write('keep\n');
  t.ok((await waited).equals(content), 'its content, from the file the other process kept');
  t.equal(fetched.n, 0, 'fetched once on this host: by the other process');
  t.equal(waiter.stats.joined, 1);

  // A holder that hung (its beat 20 s old and not renewed, the lock held for longer than the stale time): fetched here.
  const other = randomBytes(4096);
  const otherHash = chunkHash(other);
  const hung = otherHolder(dir, otherHash, other, true);
  t.teardown(() => hung.child.kill('SIGKILL'));
  await hung.said('locked');
  const taker = new ChunkCache({ dir, staleLockMs: 4000 });
  const took = { n: 0 };
  t.ok((await taker.get(otherHash, fetchHere(other, took))).equals(other));
  t.equal(took.n, 1, 'fetched here once the holder was seen hung');
  await taker.settled();

  // A holder that died holding the lock: the kernel let it go; this process takes it and fetches.
  const third = randomBytes(4096);
  const thirdHash = chunkHash(third);
  const dead = otherHolder(dir, thirdHash, third, false);
  await dead.said('locked');
  dead.child.kill('SIGKILL');
  await once(dead.child, 'exit');
  const after = new ChunkCache({ dir });
  const count = { n: 0 };
  t.ok((await after.get(thirdHash, fetchHere(third, count))).equals(third));
  t.equal(count.n, 1, 'fetched here');
  t.equal(after.stats.misses, 1, 'as a miss, under its own lock');
  await after.settled();
});

t.test('a holder beats while its fetch lasts: its slot in the lock file holds a fresh time', async (t) => {
  const dir = tempDir(t);
  const cache = new ChunkCache({ dir });
  const content = randomBytes(4096);
  const hash = chunkHash(content);
  let answer!: (b: Buffer) => void;
  const held = cache.get(hash, () => new Promise<Buffer>((resolve) => (answer = resolve)));
  const slot = () => {
    const fd = openSync(join(dir, 'lock'), 'r');
    try {
      const b = Buffer.alloc(8);
      return readSync(fd, b, 0, 8, lockSlotOffset(hash)) === 8 ? b.readDoubleLE() : 0;
    } finally {
      closeSync(fd);
    }
  };
  const beat = await until('the holder to beat', () => (Date.now() - slot() < 5000 ? slot() : undefined), 10_000);
  t.ok(beat > 0, 'a beat in the slot while the fetch is under way');
  answer(content);
  t.ok((await held).equals(content));
  await cache.settled();
});

t.test('two caches on one directory in one process share its fetches: one request per chunk', async (t) => {
  const dir = tempDir(t);
  const a = new ChunkCache({ dir });
  const b = new ChunkCache({ dir });
  const content = randomBytes(4096);
  const hash = chunkHash(content);
  let fetches = 0;
  let answer!: (b: Buffer) => void;
  const fetch = () => {
    fetches++;
    return new Promise<Buffer>((resolve) => (answer = resolve));
  };
  const [pa, pb] = [a.get(hash, fetch), b.get(hash, fetch)];
  await until('the fetch to start', () => fetches > 0 || undefined, 5000);
  answer(content);
  t.ok((await pa).equals(content) && (await pb).equals(content));
  t.equal(fetches, 1);
  await a.settled();
});

t.test(
  'one process, caches of two sessions on one directory: a fetch that fails for one (its store, its key) is made again by the other, not failed for it',
  async (t) => {
    const dir = tempDir(t);
    const [a, b] = [new ChunkCache({ dir }), new ChunkCache({ dir })];
    const content = randomBytes(4096);
    const hash = chunkHash(content);
    let refuse: ((e: Error) => void) | undefined;
    const failing = a.get(hash, () => new Promise<Buffer>((_, reject) => (refuse = reject)));
    let fetchedByB = 0;
    const joined = b.get(hash, async () => {
      fetchedByB++;
      return content;
    });
    await until('the first fetch to start', () => (refuse ? true : undefined), 5000);
    refuse!(Object.assign(new Error('sealed with a key this session lacks'), { code: 'ERR_STORE_DENIED' }));
    await t.rejects(failing, { code: 'ERR_STORE_DENIED' }, 'the session whose fetch failed sees its own error');
    t.ok((await joined).equals(content), 'the other fetched it for itself');
    t.equal(fetchedByB, 1);
    await b.settled();

    // Wanted again while it is being kept: the second want waits for the file, never a second fetch.
    const other = randomBytes(4096);
    const otherHash = chunkHash(other);
    let fetches = 0;
    const first = a.get(otherHash, async () => {
      fetches++;
      return other;
    });
    await first;
    const second = await b.get(otherHash, async () => {
      fetches++;
      return other;
    });
    t.ok(second.equals(other));
    t.equal(fetches, 1, 'one fetch: the second want joined the first until its file was kept');
    await a.settled();
    t.throws(() => new ChunkCache({ dir, staleLockMs: 1000 }), { code: 'ERR_USAGE' }, 'a stale time under two beats is refused');
  },
);
