// The background yields the link to demand: across a real link (a veth pair
// into a network namespace this test makes, shaped to 1 Gbit/s by tbf) the
// source paces its bulk channel, sends each request's neighbours on the
// background instead of ahead of the next fault, and never sends a page
// twice; on loopback nothing is paced. Behaviour only: the figures come from
// `postcopy bench --link veth-1g`.
import t from 'tap';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { floorImageFile, startSource } from '../bench/source.js';
import { touchSequence } from '../bench/patterns.js';
import { Destination } from '../client/destination.js';
import { touchPages } from '../lib/workload.js';
import { gigabitLink } from './helpers.js';

const PAGES = 4096; // 16 MiB: about 130 ms at 1 Gbit/s
const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'link-share-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const image = floorImageFile(dir, PAGES);

async function restoreOver(up: { address: string; token?: string }, pattern: 'random' | 'sequential', background = true) {
  // (Packed runs refused: the floor's image packs to almost nothing, and this is about the link's own bytes.)
  const dest = await Destination.connect({
    source: up.address,
    token: up.token,
    refusePackedRuns: true,
    window: { forward: 8, backward: 2 },
    background: { enabled: background, rateBytesPerSecond: 0 },
  });
  try {
    await touchPages(dest.regions[0].mapping.address, PAGES, touchSequence(pattern, PAGES, 7), {});
    const report = await dest.finish();
    return { report, stats: dest.stats() };
  } finally {
    dest.close();
  }
}

t.test('across a 1 Gbit/s link the background is paced, and still brings every page byte for byte', async (t) => {
  const up = await gigabitLink(t, image, dir);
  if (!up) return;
  for (const pattern of ['random', 'sequential'] as const) {
    const { report, stats } = await restoreOver({ address: up.source.address, token: up.token }, pattern);
    t.equal(report.digestMatch, true, `${pattern}: the restored memory equals the image`);
    const src = report.source as Record<string, unknown> & { backgroundPacing?: Record<string, number> };
    t.ok(src.backgroundPacing, `${pattern}: the source paced its bulk channel`);
    t.ok(src.backgroundPacing!.waits > 0, `${pattern}: the pacer held the background back ${src.backgroundPacing!.waits} times`);
    t.ok(src.backgroundPacing!.windowBytes >= 12288, `${pattern}: a window of ${src.backgroundPacing!.windowBytes} bytes (three pages at least)`);
    t.equal(src.pagesWindow, 0, `${pattern}: no neighbour went ahead of the next fault on the urgent channel`);
    t.equal(src.pagesResent, 0, `${pattern}: no page on its way on the bulk channel was sent again`);
    t.equal(stats.duplicatePages, 0, `${pattern}: the destination received no page twice`);
  }
});

t.test('a destination that leaves while the background waits for the link: the source serves the next one whole', async (t) => {
  const up = await gigabitLink(t, image, dir);
  if (!up) return;
  const first = await Destination.connect({
    source: up.source.address,
    token: up.token,
    refusePackedRuns: true,
    background: { enabled: true, rateBytesPerSecond: 0 },
  });
  await touchPages(first.regions[0].mapping.address, PAGES, touchSequence('random', 16, 1), {});
  first.close();
  const { report } = await restoreOver({ address: up.source.address, token: up.token }, 'random');
  t.equal(report.digestMatch, true, 'the next destination restores the image byte for byte');
});

t.test('over loopback TCP and a unix socket nothing is paced, and the neighbours go with each answer', async (t) => {
  for (const address of ['tcp:127.0.0.1:0', `unix:${join(dir, 'plain.sock')}`]) {
    const source = await startSource(image, address);
    t.teardown(() => source.close());
    // (Without the background, so every fault has neighbours left to send.)
    const { report } = await restoreOver({ address: source.address, token: source.token }, 'random', false);
    t.equal(report.digestMatch, true, `${address}: byte for byte`);
    const src = report.source as Record<string, unknown>;
    t.equal(src.backgroundPacing, undefined, `${address}: no pacer`);
    t.ok((src.pagesWindow as number) > 0, `${address}: neighbours went with the answers (${src.pagesWindow as number} pages)`);
  }
});
