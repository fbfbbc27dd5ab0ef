// Restoring from an image on this host, with no source process: the engine
// installs each fault straight from the mapped image (ImageSupply) and fills
// the rest itself. Real userfaultfd, real files (sparse ones too), the real
// VMM fixture.
import t from 'tap';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { closeSync, openSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../lib/image.js';
import { Destination } from '../client/destination.js';
import { VmmHandler, type VmmSessionSummary } from '../client/vmm-handler.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { FaultEngine } from '../client/fault-engine.js';
import { mapAnonymous } from '../lib/memory.js';
import { Userfaultfd } from '../lib/uffd.js';
import { PAGE, buildFixture, randomImage, runCli, tempDir, until, writeImage } from './helpers.js';
import type { Test } from 'tap';

/** A sparse file: `pages` pages with data, a hole of `hole` pages in the middle, and an all-zero data page. */
function sparseImage(t: Test, pages: number, hole: number): { path: string; bytes: Buffer } {
  const bytes = randomImage(pages, 0);
  const start = Math.floor(pages / 3);
  bytes.fill(0, start * PAGE, (start + hole) * PAGE);
  bytes.fill(0, 5 * PAGE, 6 * PAGE); // written zeros: a zero page that is not a hole
  const path = join(tempDir(t), 'sparse.img');
  const fd = openSync(path, 'w');
  ftruncateSync(fd, bytes.length);
  writeSync(fd, bytes, 0, start * PAGE, 0);
  writeSync(fd, bytes, (start + hole) * PAGE, bytes.length - (start + hole) * PAGE, (start + hole) * PAGE);
  closeSync(fd);
  return { path, bytes };
}

async function restoreLocally(t: Test, image: Image, options: { background?: { enabled: boolean } } = {}) {
  const dest = await Destination.connect({ image, ...options });
  t.teardown(() => dest.close());
  const touching = dest.regions.map((r) => {
    const pages = r.mapping.length / PAGE;
    return touchPages(r.mapping.address, pages, shuffledOrder(pages, 7), { mapping: r.mapping });
  });
  const [report, ...touched] = await Promise.all([dest.finish(), ...touching]);
  return { dest, report, touched };
}

for (const background of [true, false]) {
  t.test(`a local image restores byte-exact, no sockets: holes, zero pages, several regions (background ${background ? 'on' : 'off'})`, async (t) => {
    const sparse = sparseImage(t, 1500, 400);
    const second = randomImage(300, 7);
    const image = Image.open([{ path: sparse.path }, { buffer: second }]);
    t.teardown(() => image.close());
    const { dest, report, touched } = await restoreLocally(t, image, { background: { enabled: background } });
    t.equal(report.digestMatch, true, 'both regions equal the image');
    t.ok(Buffer.from(dest.regions[0].mapping.buffer()).equals(sparse.bytes), 'region 0 byte for byte');
    t.ok(Buffer.from(dest.regions[1].mapping.buffer()).equals(second), 'region 1 byte for byte');
    t.equal(report.bytesReceived, 0, 'nothing came over a socket');
    // Small pages (the default): every hole and zero page goes in as a zero page. With transparent
    // huge pages, one inside an aligned 2 MiB that holds data goes as data (test/huge-installs.test.ts).
    t.ok(report.zeroPages >= 400 + 1 + 300 / 7, `holes and zero pages went in as zero pages (${report.zeroPages})`);
    t.equal(report.pagesOnDemand + report.pagesWindow + report.pagesBackground, 1800, 'every page installed once');
    t.equal(touched.length, 2);
    if (!background) t.equal(report.pagesBackground, 0, 'no background fill when it is off');
    t.equal(dest.status().state, 'verified');
  });
}

t.test('the prefault window comes from the image too: a sequential toucher faults about once per window', async (t) => {
  const bytes = randomImage(1024);
  const image = Image.open([{ buffer: bytes }]);
  t.teardown(() => image.close());
  const dest = await Destination.connect({ image, window: { forward: 15, backward: 0 }, background: { enabled: false } });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  // One page every 16: each fault's window brings the 15 after it, so no page is touched twice.
  const order = Uint32Array.from({ length: 1024 }, (_, i) => i);
  const [report] = await Promise.all([dest.finish(), touchPages(r.address, 1024, order, { mapping: r })]);
  t.equal(report.digestMatch, true);
  t.equal(report.pagesOnDemand + report.pagesWindow, 1024);
  t.ok(report.pagesWindow > 0, `window pages installed (${report.pagesWindow})`);
  t.ok(report.faults < 1024, `fewer faults than pages (${report.faults})`);
});

t.test('an engine serving a local image takes no data channels', async (t) => {
  const image = Image.open([{ buffer: randomImage(16) }]);
  t.teardown(() => image.close());
  const dest = await Destination.connect({ image });
  t.teardown(() => dest.close());
  t.throws(() => dest.engine.attachChannels({ urgentFd: openSync('/dev/null', 'r'), bulkFd: openSync('/dev/null', 'r') }), { code: 'ERR_ENGINE_STATE' });
  const r = dest.regions[0].mapping;
  await Promise.all([dest.finish(), touchPages(r.address, 16, shuffledOrder(16, 1), { mapping: r })]);
});

t.test('pages found present when an engine takes over are left alone: the fill installs only the missing ones, once each', async (t) => {
  const pages = 64;
  const bytes = randomImage(pages, 3);
  const image = Image.open([{ buffer: bytes }]);
  t.teardown(() => image.close());
  const memory = mapAnonymous(pages * PAGE);
  t.teardown(() => memory.unmap());
  // A handler that died had installed the even pages (here written before the region is registered).
  for (let p = 0; p < pages; p += 2) memory.buffer(p * PAGE, PAGE).fill(0xa5);
  const uffd = Userfaultfd.open();
  t.teardown(() => uffd.close());
  uffd.handshake();
  uffd.register(memory.address, pages * PAGE);
  const engine = new FaultEngine({
    uffd: uffd.fd,
    regions: [{ base: memory.address, length: pages * PAGE, pageSize: PAGE }],
    local: { image: image.regions.map((r) => r.spec), window: { forward: 0, backward: 0 }, background: false },
  });
  t.teardown(() => engine.stop());
  const held = new Uint8Array(pages / 8).fill(0x55); // bit p set for every even p
  t.equal(engine.markResident(0, held), pages / 2, 'the even pages settle as found');
  engine.start();
  engine.startBackground();
  await until('every page resident', () => engine.complete);
  const s = engine.stats();
  t.equal(s.pagesInstalledBackground, pages / 2, 'the fill installed the odd pages only');
  t.equal(s.duplicatePages, 0, 'and never looked at a page found present');
  for (let p = 0; p < pages; p++) {
    const want = p % 2 === 0 ? Buffer.alloc(PAGE, 0xa5) : bytes.subarray(p * PAGE, (p + 1) * PAGE);
    if (!Buffer.from(memory.buffer(p * PAGE, PAGE)).equals(want)) t.fail(`page ${p} differs`);
  }
});

t.test('the image stays mapped while an engine serves from it', async (t) => {
  const image = Image.open([{ buffer: randomImage(64) }, { path: writeImage(tempDir(t), randomImage(64)) }]);
  const dest = await Destination.connect({ image, background: { enabled: false } });
  t.throws(() => image.close(), { code: 'ERR_MAPPING_BUSY' }, 'the file mapping is pinned by the engine');
  dest.close();
  image.close();
  t.pass('closes once the engine stopped');
});

t.test('a VMM restores from a local image through the handler: byte-exact from four threads, installed pages checked', async (t) => {
  const dir = tempDir(t);
  const bytes = randomImage(2048, 5);
  const imagePath = writeImage(dir, bytes);
  const image = Image.open([{ path: imagePath }]);
  const handler = new VmmHandler({ image, background: { enabled: false } });
  const socket = join(dir, 'handler.sock');
  await handler.listen(socket);
  t.teardown(async () => {
    await handler.close();
    image.close();
  });
  const ended = once(handler, 'session-end').then(([s]) => s as VmmSessionSummary);
  const checked = once(handler, 'installed-check').then(([c]) => c as { result: string; checkedPages: number });
  const child = spawn(buildFixture('vmm'), ['--socket', socket, '--image', imagePath, '--threads', '4', '--order', 'random', '--hold'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const check = await checked;
  t.equal(check.result, 'match', 'the pages installed in the guest match the image');
  t.equal(check.checkedPages, 2048);
  child.stdin.end();
  const [code] = await once(child, 'close');
  t.equal(code, 0, 'the VMM verified every byte');
  t.match(JSON.parse(out.trim()), { ok: true, pages: 2048, mismatchedPages: 0 });
  const summary = await ended;
  t.equal(summary.complete, true);
  t.equal(summary.bytesReceived, 0, 'no page crossed a socket');
  t.equal(summary.recovery?.source, 'image');
});

t.test('postcopy restore --image: the CLI restores a sparse file with no source', async (t) => {
  const sparse = sparseImage(t, 600, 100);
  const out = join(tempDir(t), 'restored.bin');
  const r = await runCli(['restore', '--image', sparse.path, '--out', out, '--json', '--log-level', 'warn']);
  t.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout.trim());
  t.equal(report.digestMatch, true);
  t.equal(report.recovery.source, 'image');
  const { readFileSync } = await import('node:fs');
  t.ok(readFileSync(out).equals(sparse.bytes), 'the written file equals the image');
  const both = await runCli(['restore', '--image', sparse.path, '--source', 'unix:/nowhere']);
  t.equal(both.code, 2);
  t.match(both.stderr, /ERR_USAGE/);
});
