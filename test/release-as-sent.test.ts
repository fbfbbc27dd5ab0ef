// Release as sent: a source that owns its image (shared memory) frees each
// page once the destination has installed it, never merely sent it, so a move
// on one host never holds two copies. Real tmpfs files, sockets, and a cut
// link (the fault-injection proxy) resumed without losing a page.
import t from 'tap';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { Image } from '../server/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination } from '../client/destination.js';
import { VmmHandler } from '../client/vmm-handler.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { FaultProxy } from './fault-proxy.js';
import { FAST_RECOVERY, PAGE, buildFixture, randomImage, runCli, tempDir, writeImage } from './helpers.js';
import type { Test } from 'tap';

const PAGES = 2048;

function shmImage(t: Test, bytes: Buffer): string {
  const dir = mkdtempSync('/dev/shm/uffd-postcopy-');
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return writeImage(dir, bytes);
}

/** Bytes of the file that still hold memory. */
const allocated = (path: string) => statSync(path).blocks * 512;

/** Waits (at most 10 s) for check() to hold. */
async function until(check: () => boolean): Promise<void> {
  for (const deadline = Date.now() + 10_000; !check() && Date.now() < deadline;) await new Promise((r) => setTimeout(r, 10));
}

t.test('each page installed is freed at the source; the destination is byte-exact', async (t) => {
  const bytes = randomImage(PAGES, 0);
  const path = shmImage(t, bytes);
  const image = Image.open([{ path }]);
  const server = new PageServer({ image, releaseAsSent: true });
  t.teardown(async () => {
    await server.close();
    image.close();
  });
  const a = await server.listen(`unix:${join(tempDir(t), 'source.sock')}`);
  t.ok(allocated(path) >= PAGES * PAGE, 'the image is all in memory at first');
  const dest = await Destination.connect({ source: `unix:${(a as { path: string }).path}`, background: { enabled: true, rateBytesPerSecond: 16 << 20 } });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  const [report] = await Promise.all([dest.finish(), touchPages(r.address, PAGES, shuffledOrder(PAGES, 3), { mapping: r })]);
  t.equal(report.digestMatch, true, 'the digest taken before any page was freed matches');
  t.ok(Buffer.from(r.buffer()).equals(bytes), 'byte for byte');
  await until(() => server.releasedPages === PAGES);
  t.equal(server.releasedPages, PAGES, 'every page freed once installed');
  t.ok(allocated(path) < PAGES * PAGE * 0.05, `the source holds almost nothing now (${allocated(path)} bytes)`);
});

t.test('a cut link resumed mid-way loses nothing: freed pages were installed, the rest still comes', async (t) => {
  const bytes = randomImage(PAGES, 7);
  const path = shmImage(t, bytes);
  const image = Image.open([{ path }]);
  const server = new PageServer({ image, releaseAsSent: true, token: 'a token for tcp', heartbeat: { intervalMs: 50, silenceMs: 400 } });
  t.teardown(async () => {
    await server.close();
    image.close();
  });
  const a = await server.listen('tcp:127.0.0.1:0');
  const proxy = await FaultProxy.start(t, `tcp:127.0.0.1:${(a as { port: number }).port}`);
  proxy.inject({ connection: 2, direction: 'down', afterBytes: 400 * PAGE, action: 'rst' });
  const dest = await Destination.connect({
    source: proxy.address,
    token: 'a token for tcp',
    recovery: FAST_RECOVERY,
    background: { enabled: true, rateBytesPerSecond: 16 << 20 },
  });
  t.teardown(() => dest.close());
  const report = await dest.finish();
  t.equal(report.digestMatch, true, 'byte-exact after the resume');
  t.ok(dest.status().resumes >= 1, 'the session resumed');
  t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(bytes));
  await until(() => server.releasedPages === PAGES);
  t.ok(allocated(path) < PAGES * PAGE * 0.05, 'and the source freed it all');
});

t.test('release-as-sent serves one destination, and needs an image in shared memory it may write', async (t) => {
  const path = shmImage(t, randomImage(64));
  const image = Image.open([{ path }]);
  const server = new PageServer({ image, releaseAsSent: true });
  t.teardown(async () => {
    await server.close();
    image.close();
  });
  const a = await server.listen(`unix:${join(tempDir(t), 'source.sock')}`);
  const source = `unix:${(a as { path: string }).path}`;
  const first = await Destination.connect({ source, background: { enabled: false } });
  t.teardown(() => first.close());
  await t.rejects(Destination.connect({ source }), { code: 'ERR_IMAGE_CONSUMED' }, 'a second destination is refused');
  const onDisk = Image.open([{ path: writeImage(tempDir(t), randomImage(16)) }]);
  t.teardown(() => onDisk.close());
  t.throws(() => new PageServer({ image: onDisk, releaseAsSent: true }), { code: 'ERR_IMAGE_INVALID' });
  const cli = await runCli(['serve', '--image', join(tempDir(t), 'x.bin'), '--listen', 'unix:/tmp/nowhere.sock', '--release-as-sent']);
  t.not(cli.code, 0);
});

t.test('a VMM through the handler: its installed pages still check against the image the source has freed', async (t) => {
  const dir = tempDir(t);
  const bytes = randomImage(PAGES, 5);
  const path = shmImage(t, bytes);
  const image = Image.open([{ path }]);
  const server = new PageServer({ image, releaseAsSent: true });
  const a = await server.listen(`unix:${join(dir, 'source.sock')}`);
  const handler = new VmmHandler({ source: `unix:${(a as { path: string }).path}` });
  await handler.listen(join(dir, 'handler.sock'));
  t.teardown(async () => {
    await handler.close();
    await server.close();
    image.close();
  });
  const checked = once(handler, 'installed-check').then(([c]) => c as { result: string });
  const imageCopy = writeImage(dir, bytes, 'copy.bin'); // the fixture checks against its own copy: the source's is being freed
  const child = spawn(buildFixture('vmm'), ['--socket', join(dir, 'handler.sock'), '--image', imageCopy, '--threads', '2', '--hold'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  t.equal((await checked).result, 'match', 'checked against the sums the source took before freeing anything');
  child.stdin.end();
  const [code] = await once(child, 'close');
  t.equal(code, 0, 'the VMM verified every byte');
  await until(() => server.releasedPages === PAGES);
  t.ok(allocated(path) < PAGES * PAGE * 0.05, 'the source freed it all');
});
