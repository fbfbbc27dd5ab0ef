import t from 'tap';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination, type DestinationOptions } from '../client/destination.js';
import { memfdCreate, mapFile, punchHole } from '../lib/memory.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { PAGE, randomImage, tempDir, writeImage, until } from './helpers.js';
import type { Test } from 'tap';

/** TCP needs a token, loopback too. */
const TCP_TOKEN = 'a token for tcp';

async function serve(t: Test, image: Image, transport: 'unix' | 'tcp', token = transport === 'tcp' ? TCP_TOKEN : undefined): Promise<string> {
  const server = new PageServer({ image, token });
  t.teardown(() => server.close());
  const where = transport === 'unix' ? `unix:${join(tempDir(t), 'source.sock')}` : 'tcp:127.0.0.1:0';
  const a = await server.listen(where);
  return a.kind === 'unix' ? `unix:${a.path}` : `tcp:127.0.0.1:${a.port}`;
}

async function connect(t: Test, options: DestinationOptions): Promise<Destination> {
  const tcp = 'source' in options && typeof options.source === 'string' && options.source.startsWith('tcp:');
  const dest = await Destination.connect({ ...(tcp && !('token' in options && options.token) ? { token: TCP_TOKEN } : {}), ...options });
  t.teardown(() => dest.close());
  return dest;
}

/** Waits (bounded) until `pages` pages are resident. */
async function residentAtLeast(dest: Destination, pages: number): Promise<void> {
  await until(`${pages} resident pages`, () => dest.stats().residentPages >= pages, 60_000, 2);
}

/** Touches every page of region 0 in a seeded random order while the transfer runs, then finishes. */
async function restoreWithFaults(dest: Destination, seed = 1) {
  const region = dest.regions[0].mapping;
  const pages = region.length / PAGE;
  const [touched, report] = await Promise.all([touchPages(region.address, pages, shuffledOrder(pages, seed)), dest.finish()]);
  return { touched, report, region };
}

for (const transport of ['unix', 'tcp'] as const) {
  t.test(`${transport}: a random image with zero pages restores bit for bit under faults and background transfer`, async (t) => {
    const pages = 4096;
    const bytes = randomImage(pages, 5);
    const source = await serve(t, Image.open([{ buffer: bytes }]), transport);
    const dest = await connect(t, { source });
    const { touched, report, region } = await restoreWithFaults(dest);
    t.equal(report.digestMatch, true, 'digests match');
    t.ok(region.buffer().equals(bytes), 'every byte matches');
    t.equal(report.pagesOnDemand + report.pagesWindow + report.pagesBackground, pages, 'each page installed once, by one of the three paths');
    t.ok(report.zeroPages >= Math.floor(pages / 5), `zero pages went out as zero runs (${report.zeroPages})`);
    t.ok(report.bytesReceived < pages * PAGE, 'zero pages carried no data');
    t.equal(report.faultLatencyUs.count <= report.faults, true);
    const order = shuffledOrder(pages, 1);
    for (let k = 0; k < pages; k += 97) t.equal(touched.firstBytes[k], bytes[order[k] * PAGE]);
  });
}

t.test('a file image with holes: holes are known without reading them and arrive as zeros', async (t) => {
  const dir = tempDir(t);
  const pages = 1024;
  const bytes = randomImage(pages);
  const path = writeImage(dir, bytes);
  const fd = openSync(path, 'r+');
  punchHole(fd, 100 * PAGE, 200 * PAGE);
  closeSync(fd);
  bytes.fill(0, 100 * PAGE, 300 * PAGE);
  const image = Image.open([{ path }]);
  t.equal(image.regions[0].holes, 200, 'SEEK_HOLE found the punched pages');
  const source = await serve(t, image, 'unix');
  const dest = await connect(t, { source });
  const { region, report } = await restoreWithFaults(dest);
  t.ok(region.buffer().equals(bytes));
  t.ok(report.zeroPages >= 200);
});

t.test('a file whose size is not a page multiple is served zero-padded to whole pages', async (t) => {
  const dir = tempDir(t);
  const content = randomImage(3).subarray(0, 3 * PAGE - 100);
  const path = writeImage(dir, Buffer.from(content));
  const source = await serve(t, Image.open([{ path }]), 'unix');
  const dest = await connect(t, { source, background: { enabled: true } });
  const report = await dest.finish();
  const got = dest.regions[0].mapping.buffer();
  t.equal(got.length, 3 * PAGE);
  t.ok(got.subarray(0, content.length).equals(content));
  t.ok(got.subarray(content.length).every((b) => b === 0));
  t.equal(report.digestMatch, true);
});

t.test('shared memory (a memfd) is served in place, and several regions at once', async (t) => {
  const fd = memfdCreate('vm-ram');
  t.teardown(() => closeSync(fd));
  ftruncateSync(fd, 256 * PAGE);
  const ram = mapFile(fd, 256 * PAGE);
  t.teardown(() => ram.unmap());
  const content = randomImage(256, 3);
  content.copy(ram.buffer());
  const second = randomImage(64);
  const source = await serve(
    t,
    Image.open([
      { fd, name: 'ram' },
      { buffer: second, name: 'rom' },
    ]),
    'unix',
  );
  const dest = await connect(t, { source });
  t.same(
    dest.regions.map((r) => [r.info.name, r.info.length]),
    [
      ['ram', 256 * PAGE],
      ['rom', 64 * PAGE],
    ],
  );
  const report = await dest.finish();
  t.ok(dest.regions[0].mapping.buffer().equals(content));
  t.ok(dest.regions[1].mapping.buffer().equals(second));
  t.equal(report.pages, 320);
});

t.test('several threads faulting on the same pages: each page is requested once', async (t) => {
  const pages = 512;
  const bytes = randomImage(pages);
  const source = await serve(t, Image.open([{ buffer: bytes }]), 'unix');
  const dest = await connect(t, { source, window: { forward: 0, backward: 0 }, background: { enabled: false } });
  const region = dest.regions[0].mapping;
  const order = shuffledOrder(pages, 9);
  const touches = await Promise.all([1, 2, 3, 4].map(() => touchPages(region.address, pages, order)));
  const report = await dest.finish();
  t.equal(report.digestMatch, true);
  for (const touched of touches)
    t.ok(
      touched.firstBytes.every((b, k) => b === bytes[order[k] * PAGE]),
      'each thread read the right bytes',
    );
  const stats = dest.stats();
  t.equal(stats.pagesRequested, pages, 'one request per page');
  t.equal(report.pagesOnDemand, pages, 'every page came on demand');
  t.ok(stats.faults >= pages, `faults (${stats.faults}) >= pages`);
});

t.test('pure on-demand: only touched pages (and nothing else) are transferred', async (t) => {
  const pages = 256;
  const bytes = randomImage(pages);
  const source = await serve(t, Image.open([{ buffer: bytes }]), 'unix');
  const dest = await connect(t, { source, window: { forward: 0, backward: 0 }, background: { enabled: false } });
  const region = dest.regions[0].mapping;
  const touched = await touchPages(region.address, pages, Uint32Array.of(3, 70, 200));
  t.same([...touched.firstBytes], [bytes[3 * PAGE], bytes[70 * PAGE], bytes[200 * PAGE]]);
  // The faulting thread wakes at the install, a moment before the counters move.
  await residentAtLeast(dest, 3);
  const stats = dest.stats();
  t.equal(stats.residentPages, 3);
  t.equal(stats.pagesInstalledBackground + stats.pagesInstalledWindow, 0);
  const bitmap = dest.engine.receivedBitmap(0);
  const resident = [...Array(pages).keys()].filter((p) => bitmap[p >> 3] & (1 << (p & 7)));
  t.same(resident, [3, 70, 200]);
});

t.test('the prefault window brings the next F and previous B pages with each request', async (t) => {
  const pages = 256;
  const bytes = randomImage(pages);
  const source = await serve(t, Image.open([{ buffer: bytes }]), 'unix');
  const dest = await connect(t, { source, window: { forward: 5, backward: 3 }, background: { enabled: false } });
  const region = dest.regions[0].mapping;
  await touchPages(region.address, pages, Uint32Array.of(100));
  await residentAtLeast(dest, 9); // the window arrives right behind the requested page
  const bitmap = dest.engine.receivedBitmap(0);
  const resident = [...Array(pages).keys()].filter((p) => bitmap[p >> 3] & (1 << (p & 7)));
  t.same(resident, [97, 98, 99, 100, 101, 102, 103, 104, 105]);
  const stats = dest.stats();
  t.equal(stats.pagesInstalledRequested, 1);
  t.equal(stats.pagesInstalledWindow, 8);
  await touchPages(region.address, pages, Uint32Array.of(97, 105));
  t.equal(dest.stats().faults, 1, 'window pages no longer fault');
});

t.test('background transfer alone makes everything resident with no faults', async (t) => {
  const pages = 2048;
  const bytes = randomImage(pages, 11);
  const source = await serve(t, Image.open([{ buffer: bytes }]), 'tcp');
  const dest = await connect(t, { source });
  const report = await dest.finish();
  t.equal(report.faults, 0);
  t.equal(report.pagesBackground, pages);
  t.ok(dest.regions[0].mapping.buffer().equals(bytes));
});

t.test('a rate-limited background transfer never runs ahead of its rate', async (t) => {
  const pages = 4096;
  const rate = 8 << 20; // 8 MiB/s: 16 MiB takes about two seconds
  const source = await serve(t, Image.open([{ buffer: randomImage(pages) }]), 'unix');
  const before = process.hrtime.bigint();
  const dest = await connect(t, { source, window: { forward: 0, backward: 0 }, background: { enabled: true, rateBytesPerSecond: rate } });
  await new Promise((r) => setTimeout(r, 300));
  const received = dest.stats().bytesReceived;
  const elapsed = Number(process.hrtime.bigint() - before) / 1e9;
  // The limiter lets at most rate*elapsed through, plus the one run already in flight.
  t.ok(received <= rate * elapsed + (2 << 20) + 4096, `${received} bytes in ${elapsed.toFixed(3)} s at ${rate} B/s`);
  t.ok(dest.stats().residentPages < pages, 'not finished yet');
  const report = await dest.finish();
  t.equal(report.digestMatch, true);
});

t.test('requested pages are served while the background stream is still running', async (t) => {
  const pages = 16384; // 64 MiB at 32 MiB/s: the stream runs for about two seconds
  const bytes = randomImage(pages);
  const source = await serve(t, Image.open([{ buffer: bytes }]), 'unix');
  const dest = await connect(t, { source, background: { enabled: true, rateBytesPerSecond: 32 << 20 } });
  const region = dest.regions[0].mapping;
  const order = shuffledOrder(pages, 5).subarray(0, 512);
  const touched = await touchPages(region.address, pages, order);
  t.ok(touched.firstBytes.every((b, k) => b === bytes[order[k] * PAGE]));
  const mid = dest.stats();
  t.ok(mid.pagesInstalledRequested > 0, 'pages were served on demand, not left to the stream');
  t.ok(mid.residentPages < pages, 'while the stream was still running');
  const report = await dest.finish();
  t.equal(report.digestMatch, true);
});

t.test('many destinations restore from one source at once', async (t) => {
  const pages = 1024;
  const bytes = randomImage(pages, 4);
  const source = await serve(t, Image.open([{ buffer: bytes }]), 'unix');
  const dests = await Promise.all([1, 2, 3].map(() => connect(t, { source })));
  const results = await Promise.all(dests.map((d, i) => restoreWithFaults(d, i + 1)));
  for (const { region, report } of results) {
    t.equal(report.digestMatch, true);
    t.ok(region.buffer().equals(bytes));
  }
});

t.test('a destination closed by its owner before every page is in says so (ERR_SESSION_CLOSED), not that the source went away', async (t) => {
  const pages = 64;
  const bytes = randomImage(pages);
  const source = await serve(t, Image.open([{ buffer: bytes }]), 'unix');
  const image = Image.open([{ buffer: bytes }]);
  t.teardown(() => image.close());
  for (const options of [{ source }, { image }] as DestinationOptions[]) {
    const dest = await connect(t, { ...options, background: { enabled: false } });
    const finishing = dest.finish();
    const resident = dest.session.whenResident();
    dest.close();
    await t.rejects(finishing, { code: 'ERR_SESSION_CLOSED' }, `${'image' in options ? 'a local image' : 'a source'}: finish() names the close`);
    await t.rejects(resident, { code: 'ERR_SESSION_CLOSED' }, 'and so does whenResident()');
  }
});
