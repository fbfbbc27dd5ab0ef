// Release as sent: a source that owns its image (shared memory) frees each
// page once the destination has installed it, never merely sent it, so a move
// on one host never holds two copies. Real tmpfs files, sockets, and a cut
// link (the fault-injection proxy) resumed without losing a page.
import t from 'tap';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { basename, dirname, join } from 'node:path';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination } from '../client/destination.js';
import { VmmHandler } from '../client/vmm-handler.js';
import { SourceConnection } from '../client/source-connection.js';
import { transferOptions } from '../lib/transfer.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { FaultProxy } from './fault-proxy.js';
import { FAST_RECOVERY, PAGE, buildFixture, randomImage, runCli, spawnCli, startServeCli, tempDir, until, writeImage } from './helpers.js';
import type { Test } from 'tap';

const PAGES = 2048;

function shmImage(t: Test, bytes: Buffer): string {
  const dir = mkdtempSync('/dev/shm/uffd-postcopy-');
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return writeImage(dir, bytes);
}

/** Bytes of the file that still hold memory. */
const allocated = (path: string) => statSync(path).blocks * 512;

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
  await until('every page freed', () => server.releasedPages === PAGES, 10_000);
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
  await until('every page freed', () => server.releasedPages === PAGES, 10_000);
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
  await until('every page freed', () => server.releasedPages === PAGES, 10_000);
  t.ok(allocated(path) < PAGES * PAGE * 0.05, 'the source freed it all');
});

/** `postcopy restore ARGS` as a child: its exit code and output; killed at teardown. */
function restoreCli(t: Test, args: string[]) {
  return spawnCli(t, ['restore', ...args]).exited;
}

/** A release-as-sent move under way, its source (a `serve` process) killed with SIGKILL once it has freed part of the image. */
async function moveKilledMidway(t: Test, restoreArgs: string[]) {
  const dir = tempDir(t);
  const bytes = randomImage(8192, 13);
  const path = shmImage(t, bytes);
  const socket = `unix:${join(dir, 'src.sock')}`;
  const first = await startServeCli(t, ['--image', path, '--listen', socket, '--release-as-sent']);
  const out = join(dir, 'restored.bin');
  const restore = restoreCli(t, [
    '--source',
    socket,
    '--rate',
    '8M',
    '--workload',
    'none',
    '--out',
    out,
    '--json',
    '--silence-timeout',
    '500ms',
    ...restoreArgs,
  ]);
  await until('the source freed part of the image', () => allocated(path) < bytes.length * 0.8, 30_000);
  first.child.kill('SIGKILL');
  await once(first.child, 'close');
  t.ok(allocated(path) < bytes.length, 'pages were freed before the kill: they exist only in the restore now');
  return { dir, bytes, path, socket, out, restore };
}

t.test('a release-as-sent source killed (-9) mid-move and started again: the restore resumes and ends byte-exact, and the source exits 0', async (t) => {
  // On the old main every resume was refused (ERR_IMAGE_MISMATCH: the freed pages changed the fingerprint) and the freed pages were lost.
  // The give-up time bounds the test: a restore whose resumes are all refused fails within it.
  const { bytes, path, socket, out, restore } = await moveKilledMidway(t, ['--give-up-after', '30s']);
  const again = await startServeCli(t, ['--image', path, '--listen', socket, '--release-as-sent']);
  const { code, stdout, stderr } = await restore;
  const serveCode = await until('the restarted source to exit', () => again.child.exitCode ?? undefined, 10_000);
  t.equal(
    code,
    0,
    stderr
      .split('\n')
      .filter((l) => l.includes('"level":50'))
      .join('\n'),
  );
  const report = JSON.parse(stdout);
  t.equal(report.digestMatch, true, 'the digest check at the end compares with the image as it was before anything was freed');
  t.ok(report.recovery.resumes >= 1, 'the restore resumed on the restarted source');
  t.ok(readFileSync(out).equals(bytes), '--out holds the image, byte for byte');
  t.equal(serveCode, 0, 'the restarted source exited by itself once its destination held every page');
  t.ok(allocated(path) < bytes.length * 0.05, 'and the image was freed');
});

t.test('a release-as-sent source killed (-9) mid-move that never comes back: with --give-up-after the restore fails and writes nothing', async (t) => {
  const { out, restore } = await moveKilledMidway(t, ['--give-up-after', '500ms']);
  const { code, stderr } = await restore;
  t.equal(code, 1);
  t.match(stderr, /ERR_SOURCE_LOST/);
  t.notOk(existsSync(out), 'nothing half-restored was written');
});

t.test('a second destination of a release-as-sent source is refused with ERR_IMAGE_CONSUMED, during the move and after it', async (t) => {
  // On the old main a second restore after the first got 8,192 zero pages and ended ERR_DIGEST_MISMATCH.
  const dir = tempDir(t);
  const bytes = randomImage(2048, 3);
  const path = shmImage(t, bytes);
  const image = Image.open([{ path }], { releaseAsSent: true });
  const server = new PageServer({ image, releaseAsSent: true });
  t.teardown(async () => {
    await server.close();
    image.close();
  });
  const a = await server.listen(`unix:${join(dir, 'source.sock')}`);
  const source = `unix:${(a as { path: string }).path}`;
  const first = await Destination.connect({ source, background: { enabled: true, rateBytesPerSecond: 4 << 20 } });
  t.teardown(() => first.close());
  await until('the first destination consumed part of the image', () => server.releasedPages > 0);
  await t.rejects(Destination.connect({ source }), { code: 'ERR_IMAGE_CONSUMED' }, 'refused while the first is being served');
  const consumed = server.whenConsumed();
  const report = await first.finish();
  t.equal(report.digestMatch, true);
  first.close();
  await consumed;
  t.equal(server.releasedPages, 2048, 'the first holds every page');
  await t.rejects(Destination.connect({ source }), { code: 'ERR_IMAGE_CONSUMED' }, 'refused after the move: the image is gone');
  // One that names the session the pages were freed for, but holds none of them, is refused at start: a freed page is never served as zeros.
  const impostor = await SourceConnection.open({ source, resume: image.releasedFor, transfer: transferOptions({}) });
  t.teardown(() => impostor.abandon());
  await t.rejects(impostor.start(), { code: 'ERR_IMAGE_CONSUMED', message: /do not cover/ }, 'a resume that does not hold the freed pages is refused');
  const cli = await runCli(['serve', '--image', path, '--listen', `unix:${join(dir, 'plain.sock')}`]);
  t.not(cli.code, 0, 'a plain serve of the consumed image refuses to start');
  t.match(cli.stderr, /ERR_IMAGE_CONSUMED/);
});

t.test('the source keeps at most its budget of pages sent and not yet confirmed installed', async (t) => {
  // On the old main nothing bounded it: the source sent as fast as the link took pages, and freed them only as reports came.
  const pages = 8192;
  const bytes = randomImage(pages, 0);
  const path = shmImage(t, bytes);
  const image = Image.open([{ path }], { releaseAsSent: true });
  const budget = 2 << 20;
  const server = new PageServer({ image, releaseAsSent: true, releaseBudgetBytes: budget });
  t.teardown(async () => {
    await server.close();
    image.close();
  });
  const a = await server.listen(`unix:${join(tempDir(t), 'source.sock')}`);
  const dest = await Destination.connect({ source: `unix:${(a as { path: string }).path}`, background: { enabled: true, rateBytesPerSecond: 0 } });
  t.teardown(() => dest.close());
  const report = await dest.finish();
  t.equal(report.digestMatch, true);
  t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(bytes), 'byte for byte');
  const [session] = server.sessions.values();
  const stats = session.stats()!;
  t.equal(stats.unconfirmedBudget, budget / PAGE, 'the budget in pages');
  t.ok(stats.budgetWaits > 0, `the background reached the budget and waited for confirmations (${stats.budgetWaits} times)`);
  t.ok(
    stats.pagesUnconfirmedPeak > 0 && stats.pagesUnconfirmedPeak <= budget / PAGE,
    `never more than the budget unconfirmed (at most ${stats.pagesUnconfirmedPeak} pages)`,
  );
  t.throws(() => new PageServer({ image, releaseAsSent: true, releaseBudgetBytes: 4096 }), { code: 'ERR_OUT_OF_RANGE' }, 'a budget below one run is refused');
});

t.test('under the budget, faults are never held back: requested pages go at once while the background waits', async (t) => {
  const pages = 8192;
  const bytes = randomImage(pages, 5);
  const path = shmImage(t, bytes);
  const image = Image.open([{ path }], { releaseAsSent: true });
  const budget = 2 << 20;
  const server = new PageServer({ image, releaseAsSent: true, releaseBudgetBytes: budget });
  t.teardown(async () => {
    await server.close();
    image.close();
  });
  const a = await server.listen(`unix:${join(tempDir(t), 'source.sock')}`);
  const dest = await Destination.connect({
    source: `unix:${(a as { path: string }).path}`,
    window: { forward: 32, backward: 0 },
    background: { enabled: true, rateBytesPerSecond: 0 },
  });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  const [report, touched] = await Promise.all([dest.finish(), touchPages(r.address, pages, shuffledOrder(pages, 11), { mapping: r })]);
  t.equal(report.digestMatch, true);
  t.equal(touched.latencyNs.length, pages, 'every touch returned');
  t.ok(Buffer.from(r.buffer()).equals(bytes), 'byte for byte');
  const [session] = server.sessions.values();
  const stats = session.stats()!;
  // Only requested pages may go past the budget (never a window page, never the background).
  t.ok(
    stats.pagesUnconfirmedPeak <= budget / PAGE + stats.pagesRequested,
    `unconfirmed at most the budget plus requested pages (${stats.pagesUnconfirmedPeak} <= ${budget / PAGE} + ${stats.pagesRequested})`,
  );
});

t.test('what a release-as-sent source freed outlives it: digests and checksums of the image as it was, beside the file', async (t) => {
  const pages = 1024;
  const bytes = randomImage(pages, 6);
  const path = shmImage(t, bytes);
  const original = Image.open([{ buffer: Buffer.from(bytes) }]);
  t.teardown(() => original.close());
  const first = Image.open([{ path }], { releaseAsSent: true });
  await first.startReleasing();
  const freed = new Uint8Array(pages / 8);
  freed.fill(0xff, 8, 40); // pages 64..319
  freed[100] = 0x0f; // and 800..803
  t.equal(first.release(0, 0, freed), 256 + 4);
  first.close(); // as a source killed now would leave it
  const again = Image.open([{ path }], { releaseAsSent: true });
  t.teardown(() => again.close());
  t.equal(again.releasedPages, 260, 'a restarted source knows which pages were freed');
  t.equal(await again.contentDigest(), await original.contentDigest(), 'and the content digest of the image as it was');
  // Pages left out of the check, freed and not: the sums of freed pages come from the journal.
  const verify = [{ id: 0, skip: [[60, 10] as [number, number], [500, 3] as [number, number], [802, 4] as [number, number]] }];
  t.same(await again.answerDone(verify), await original.answerDone(verify), 'the digest and the installed-pages checksum answer as before anything was freed');
  t.throws(() => Image.open([{ path }]), { code: 'ERR_IMAGE_CONSUMED' }, 'a plain image of it is refused: its holes are not its content');
  // The same file written afresh is a new image: the journal no longer belongs to it.
  writeImage(dirname(path), bytes, basename(path));
  const fresh = Image.open([{ path }]);
  t.teardown(() => fresh.close());
  t.equal(fresh.releasedPages, 0, 'a file written since is served whole');
});
