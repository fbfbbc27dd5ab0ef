// Working-set record and replay: a first restore records the pages its
// workload faulted on, in first-touch order; a later one installs them before
// the workload asks. Locally, from a source, and for a VMM through the
// handler; a set that is corrupt or no longer fits the image is refused.
import t from 'tap';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination, type DestinationOptions } from '../client/destination.js';
import type { VmmSessionSummary } from '../client/vmm-handler.js';
import { createInterface } from 'node:readline';
import { layoutOf, pagesIn, readWorkingSet, writeWorkingSet, type WorkingSet } from '../client/working-set.js';
import { forEachEntry, encodeFrame } from '../lib/protocol.js';
import { coldStartOrder, touchPages } from '../lib/workload.js';
import { ANY_CONNECTION, FaultProxy } from './fault-proxy.js';
import { FAST_RECOVERY, PAGE, buildFixture, cliCommand, randomImage, runCli, tempDir, writeImage, until } from './helpers.js';
import type { Test } from 'tap';

const PAGES = 4096;

/** The entries of a set as page numbers of region 0. */
function pagesOf(set: { entries: Uint8Array }): number[] {
  const out: number[] = [];
  forEachEntry(set.entries, (region, page) => out.push(region === 0 ? page : -1));
  return out;
}

function entriesOf(pages: Iterable<number>, region = 0): Uint8Array {
  const list = [...pages];
  const out = Buffer.alloc(list.length * 8);
  list.forEach((p, i) => out.writeBigUInt64LE((BigInt(region) << 48n) | BigInt(p), i * 8));
  return out;
}

async function untilStats(dest: Destination, done: (s: ReturnType<Destination['stats']>) => boolean): Promise<void> {
  await until('the destination stats', () => done(dest.stats()), 60_000, 5);
}

/** Serves `bytes` from a source process of our own (a PageServer) on a unix socket; returns its address. */
async function serve(t: Test, bytes: Buffer): Promise<string> {
  const server = new PageServer({ image: Image.open([{ buffer: bytes }]) });
  t.teardown(() => server.close());
  const a = await server.listen(`unix:${join(tempDir(t), 'source.sock')}`);
  return `unix:${(a as { path: string }).path}`;
}

/** A recording restore: the cold start of run `seed`; returns the set and the order it touched. */
async function record(t: Test, from: DestinationOptions, seed: number): Promise<{ set: WorkingSet; order: Uint32Array }> {
  const dest = await Destination.connect({ ...from, window: { forward: 0, backward: 0 }, holdBackground: true, recordWorkingSet: true });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  const order = coldStartOrder(PAGES, seed);
  await touchPages(r.address, PAGES, order, { mapping: r });
  t.equal(dest.stats().pagesInstalledBackground, 0, 'the background waited for the workload');
  dest.session.startBackground();
  const report = await dest.finish();
  t.equal(report.digestMatch, true);
  return { set: dest.workingSet(), order };
}

/** A replaying restore: waits until the set is in, then runs the cold start of run `seed`; returns the report. */
async function replay(t: Test, from: DestinationOptions, set: WorkingSet, seed: number) {
  const dest = await Destination.connect({ ...from, prefetch: set });
  t.teardown(() => dest.close());
  await untilStats(dest, (s) => s.pagesInstalledPrefetch === pagesIn(set));
  const r = dest.regions[0].mapping;
  const [report] = await Promise.all([dest.finish(), touchPages(r.address, PAGES, coldStartOrder(PAGES, seed), { mapping: r })]);
  t.equal(report.digestMatch, true, 'byte-exact');
  return report;
}

for (const where of ['local', 'unix'] as const) {
  t.test(`${where}: a recorded working set replayed on a second restore leaves only the new pages to fault`, async (t) => {
    const bytes = randomImage(PAGES, 9);
    const image = Image.open([{ buffer: bytes }]);
    t.teardown(() => image.close());
    const from: DestinationOptions = where === 'local' ? { image } : { source: await serve(t, bytes) };
    const { set, order } = await record(t, from, 1);
    t.same(pagesOf(set), [...order], 'the set holds every page touched, in first-touch order');
    t.same(set.regions, layoutOf([{ length: PAGES * PAGE, pageSize: PAGE }]).regions);
    t.equal(set.fingerprint, image.fingerprint);

    const report = await replay(t, from, set, 2);
    const setPages = new Set(pagesOf(set));
    const newPages = [...coldStartOrder(PAGES, 2)].filter((p) => !setPages.has(p)).length;
    t.equal(report.pagesPrefetched, pagesIn(set), 'every page of the set went in ahead of the workload');
    t.ok(report.pagesOnDemand <= newPages, `only pages outside the set fault (${report.pagesOnDemand} of ${newPages} new pages)`);
    t.ok(report.pagesOnDemand * 10 < pagesIn(set), `far fewer demand faults: ${report.pagesOnDemand} against ${pagesIn(set)} recorded`);
  });
}

t.test('demand faults are served while a replay is stuck: a blackholed bulk channel holds the replay, not the workload', async (t) => {
  const bytes = randomImage(PAGES);
  const token = 'a token for tcp';
  const server = new PageServer({ image: Image.open([{ buffer: bytes }]), token });
  t.teardown(() => server.close());
  const tcp = await server.listen('tcp:127.0.0.1:0');
  const proxy = await FaultProxy.start(t, `tcp:127.0.0.1:${(tcp as { port: number }).port}`);
  // The first bulk channel carries its attach reply, then nothing more. (Which
  // data channel connects first is a race: the bulk one is known by its attach frame.)
  proxy.inject({ connection: ANY_CONNECTION, carrying: 'bulk', direction: 'down', afterBytes: encodeFrame({ t: 'attached' }).length, action: 'blackhole' });
  // Every other page: no page of the set has a neighbour in it, so a fault brings its page alone (no cluster).
  const set = {
    ...layoutOf([{ length: PAGES * PAGE, pageSize: PAGE }]),
    fingerprint: '',
    entries: entriesOf(Array.from({ length: 1024 }, (_, i) => 4094 - 2 * i)),
  };
  const dest = await Destination.connect({
    source: `tcp:127.0.0.1:${proxy.port}`,
    token,
    prefetch: set,
    // A stall is not noticed while the workload touches its pages, however
    // slow a loaded machine makes that: the link is cut below once they are in.
    recovery: { ...FAST_RECOVERY, stallTimeoutMs: 120_000 },
    window: { forward: 0, backward: 0 },
  });
  t.teardown(() => dest.close());
  const r = dest.regions[0].mapping;
  // Pages of the set, in another order. (Only native threads touch the memory
  // while the proxy, which runs on this JS thread, carries the pages.)
  const wanted = Uint32Array.from({ length: 300 }, (_, i) => 4094 - 2 * ((i * 7) % 300));
  const touched = await touchPages(r.address, PAGES, wanted, { mapping: r });
  // A faulting thread is woken by the install itself, a moment before the
  // installer counts the page: the count is read once it has caught up.
  await untilStats(dest, (s) => s.pagesInstalledRequested + s.pagesInstalledPrefetch >= wanted.length);
  const during = dest.stats();
  t.equal(during.pagesInstalledPrefetch, 0, 'not one page of the replay arrived');
  t.equal(during.pagesInstalledRequested, 300, 'every touched page came on demand');
  t.same(
    [...touched.firstBytes],
    [...wanted].map((p) => bytes[p * PAGE]),
    'each touched page holds the image',
  );
  // The stuck link is cut: the session resumes on new channels, and the rest arrives.
  proxy.breakAll('fin');
  const report = await dest.finish();
  t.equal(report.digestMatch, true, 'byte-exact once the link came back');
  t.ok(dest.status().resumes >= 1, 'resumed past the stuck bulk channel');
});

t.test('a set that is corrupt, truncated, not a set, or for another image is refused and never applied', async (t) => {
  const dir = tempDir(t);
  const set = { ...layoutOf([{ length: 64 * PAGE, pageSize: PAGE }]), fingerprint: 'f'.repeat(64), entries: entriesOf([3, 1, 2]) };
  const good = join(dir, 'good.ws');
  writeWorkingSet(good, set);
  t.same(readWorkingSet(good), set, 'a set reads back as written');
  const bytes = readFileSync(good);
  const flipped = Buffer.from(bytes);
  flipped[flipped.length - 40] ^= 1;
  writeFileSync(join(dir, 'flipped.ws'), flipped);
  writeFileSync(join(dir, 'short.ws'), bytes.subarray(0, bytes.length - 9));
  writeFileSync(join(dir, 'other.ws'), 'not a working set at all');
  for (const name of ['flipped.ws', 'short.ws', 'other.ws', 'missing.ws'])
    t.throws(() => readWorkingSet(join(dir, name)), { code: 'ERR_WORKING_SET_INVALID' }, name);

  const image = Image.open([{ buffer: randomImage(128) }]);
  t.teardown(() => image.close());
  await t.rejects(Destination.connect({ image, prefetch: set }), { code: 'ERR_WORKING_SET_MISMATCH' }, 'recorded for a 64-page image, offered a 128-page one');
  const source = await serve(t, randomImage(128));
  await t.rejects(Destination.connect({ source, prefetch: set }), { code: 'ERR_WORKING_SET_MISMATCH' }, 'the same from a source');
  const outside = { ...layoutOf([{ length: 128 * PAGE, pageSize: PAGE }]), fingerprint: image.fingerprint, entries: entriesOf([5, 128]) };
  await t.rejects(Destination.connect({ image, prefetch: outside }), { code: 'ERR_WORKING_SET_MISMATCH' }, 'a page outside the image');
  const otherRegion = { ...outside, entries: entriesOf([5], 1) };
  await t.rejects(Destination.connect({ image, prefetch: otherRegion }), { code: 'ERR_WORKING_SET_MISMATCH' }, 'a region the image lacks');

  const cli = await runCli(['restore', '--image', writeImage(dir, randomImage(128)), '--prefetch', join(dir, 'flipped.ws')]);
  t.equal(cli.code, 1);
  t.match(cli.stderr, /ERR_WORKING_SET_INVALID/);
});

t.test('a VMM cold start through postcopy handle --image: recorded once, replayed by the next VMM', async (t) => {
  const dir = tempDir(t);
  const bytes = randomImage(PAGES, 11);
  const imagePath = writeImage(dir, bytes);
  const setPath = join(dir, 'cold.ws');
  const orderFile = (seed: number) => {
    const path = join(dir, `order-${seed}.bin`);
    writeFileSync(path, Buffer.from(coldStartOrder(PAGES, seed).buffer));
    return path;
  };
  /** `postcopy handle --image` with `extra`; one cold-start VMM (run `seed`); resolves with the VMM's exit code and the session's summary. */
  const coldStart = async (extra: string[], seed: number) => {
    const socket = join(dir, `handler-${seed}.sock`);
    const [cmd, ...pre] = cliCommand();
    const handler = spawn(cmd, [...pre, 'handle', '--socket', socket, '--image', imagePath, '--single-process', '--log-level', 'warn', ...extra], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    t.teardown(() => handler.kill('SIGTERM'));
    const lines = createInterface({ input: handler.stdout! })[Symbol.asyncIterator]();
    t.ok(JSON.parse((await lines.next()).value).listening, 'the handler listens');
    // The VMM resumes its guest a moment after the handshake, as a restoring VMM does.
    const vmm = spawn(
      buildFixture('vmm'),
      ['--socket', socket, '--image', imagePath, '--threads', '1', '--order-file', orderFile(seed), '--start-after-ms', '300'],
      {
        stdio: ['ignore', 'ignore', 'inherit'],
      },
    );
    const [code] = await once(vmm, 'close');
    const summary = JSON.parse((await lines.next()).value) as VmmSessionSummary;
    handler.kill('SIGTERM');
    await once(handler, 'close');
    return { code, summary };
  };

  const first = await coldStart(['--record-working-set', setPath], 1);
  t.equal(first.code, 0, 'the first VMM verified the pages it touched');
  const set = readWorkingSet(setPath);
  t.same(pagesOf(set), [...coldStartOrder(PAGES, 1)], 'the set is the first cold start, in its order');
  t.equal(first.summary.pagesOnDemand, pagesIn(set), 'every page of it was a demand fault');

  const second = await coldStart(['--prefetch', setPath], 2);
  t.equal(second.code, 0, 'the second VMM verified the pages it touched');
  t.equal(second.summary.pagesPrefetched, pagesIn(set), 'the whole set went in before the guest asked');
  t.ok(
    second.summary.pagesOnDemand * 10 < first.summary.pagesOnDemand,
    `demand faults: ${second.summary.pagesOnDemand} against ${first.summary.pagesOnDemand}`,
  );
  t.equal(second.summary.bytesReceived, 0, 'no source, no socket: pages came from the image file');
});
