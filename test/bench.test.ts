// The benchmark's machinery works (functional checks only: no performance is
// asserted here; figures come from `postcopy bench`).
import t from 'tap';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { constants as osConstants } from 'node:os';
import { splitForThreads, touchSequence } from '../bench/patterns.js';
import { runSuite } from '../bench/suite.js';
import { rankPolicies } from '../bench/report.js';
import { scaling, scalingSpec } from '../bench/plots.js';
import { localhostBench, localhostTable } from '../bench/localhost.js';
import { liveBench, liveTable } from '../bench/live.js';
import { qemuBench } from '../bench/qemu.js';
import { localBench, localTable } from '../bench/local.js';
import { runCli, spawnCli, tempDir, until } from './helpers.js';
import { storeEnv } from './store/env.js';

t.test('access patterns touch what they claim', async (t) => {
  const pages = 1000;
  const random = touchSequence('random', pages, 3);
  t.same(
    [...random].sort((a, b) => a - b),
    [...Array(pages).keys()],
    'random: every page once',
  );
  t.same([...touchSequence('random', pages, 3)], [...random], 'the same seed gives the same order');
  t.same([...touchSequence('sequential', pages)], [...Array(pages).keys()]);
  const strided = touchSequence('strided', pages);
  t.same([...strided.subarray(0, 3)], [0, 16, 32]);
  t.same(
    [...strided].sort((a, b) => a - b),
    [...Array(pages).keys()],
    'strided: every page once',
  );
  const hot = touchSequence('hotset', pages, 3);
  const counts = new Map<number, number>();
  for (const p of hot) counts.set(p, (counts.get(p) ?? 0) + 1);
  const top = [...counts.values()]
    .sort((a, b) => b - a)
    .slice(0, pages / 10)
    .reduce((s, c) => s + c, 0);
  t.ok(top / pages >= 0.85, `the busiest 10% of pages take ${((100 * top) / pages).toFixed(1)}% of touches`);
  const parts = splitForThreads(random, 3);
  t.same(
    parts.map((p) => p.length),
    [334, 333, 333],
  );
  t.same([parts[0][0], parts[1][0], parts[2][0], parts[0][1]], [random[0], random[1], random[2], random[3]], 'dealt round-robin');
});

t.test('the quick suite runs end to end and writes JSON, Markdown and SVG plots, by default under ./reports where it is run', async (t) => {
  const cwd = tempDir(t);
  const before = process.cwd();
  process.chdir(cwd); // as a user runs it from anywhere: the reports never go inside the installed package
  t.teardown(() => process.chdir(before));
  const lines: string[] = [];
  const { dir, report } = await runSuite({ full: false, links: ['unix'], pages: 1024, progress: (l) => lines.push(l) });
  t.match(dir, new RegExp(`^${cwd}/reports/\\d{4}-`), 'under ./reports of the directory it ran in');
  const out = dir;
  t.ok(report.floorSpread.unix.runs >= 3, 'the floor ran at least three times, spread over the run');
  t.match(report.floor.unix, { case: 'unix', pages: 1024, p50_us: Number }, 'and its median run is the yardstick');
  const free = report.results.filter((r) => r.placement === 'free');
  t.equal(free.length, 16, 'four workloads x four policies');
  for (const r of free) {
    t.equal(r.pages, 1024);
    t.ok(r.firstTouchUs.count > 0 && r.workloadMs > 0, `${r.pattern}/${r.threads}/${r.policy} has figures`);
    if (r.policy === 'on-demand' && r.pattern !== 'hotset') t.equal(r.faults >= 1024, true, 'on-demand faults every page');
    if (r.policy.startsWith('window') || r.policy === 'on-demand') {
      t.equal(r.cpus.destination['pc-bulk-rx'] !== undefined, true, 'engine threads are named');
      t.equal(r.cpus.source['pc-requests'] !== undefined, true, 'source threads are named');
    }
  }
  t.ok(report.results.some((r) => r.placement === 'one-cpu') === report.machine.cpus >= 2);
  const json = JSON.parse(readFileSync(join(out, 'results.json'), 'utf8'));
  t.equal(json.results.length, report.results.length);
  const md = readFileSync(join(out, 'report.md'), 'utf8');
  t.match(md, /\| unix \| random \| 1 \| on-demand \|/);
  t.match(md, /## Which policy wins/);
  for (const plot of report.plots) t.match(readFileSync(join(out, plot), 'utf8'), /^<svg/, `${plot} is an SVG`);
  t.ok(existsSync(join(out, 'latency-cdf-unix.svg')) && existsSync(join(out, 'residency-unix.svg')));
  t.equal(rankPolicies(report.results).length, 4);
});

t.test("scaling.svg's size axis spans the sizes measured, and the plot renders", async (t) => {
  const points = [64, 256, 1024].flatMap((mib) => [
    { mib, series: 'ours', ms: mib * 2 },
    { mib, series: 'floor', ms: mib },
  ]);
  const x = (scalingSpec(points) as unknown as { encoding: { x: { scale: { domain: number[]; nice: boolean }; axis: { values: number[] } } } }).encoding.x;
  t.same(x.scale.domain, [64, 1024]);
  t.equal(x.scale.nice, false, 'not rounded out to powers of ten');
  t.same(x.axis.values, [64, 256, 1024], 'a tick at each size measured');
  const path = join(tempDir(t), 'scaling.svg');
  await scaling(points, path);
  t.match(readFileSync(path, 'utf8'), /<svg/);
});

t.test('bench local runs end to end: every case beside its baseline, the fields scripts read', async (t) => {
  const results = await localBench(4096, 1, 1);
  // (hugetlb runs where the machine can reserve huge pages, as this one can.)
  t.same(
    results.map((r) => r.case).filter((c) => c !== 'hugetlb'),
    ['image', 'minor', 'cold-start-local', 'cold-start-unix'],
  );
  for (const r of results) {
    if (r.case === 'image') {
      t.match(r, { pages: 4096, floor: { case: 'local' }, ratio: { p50: Number, p99: Number } }, 'image faults beside the floor local case');
      t.ok(r.ours.p50_us > 0 && r.floor.p50_us > 0);
    } else if (r.case === 'hugetlb') {
      t.match(
        r,
        { pages: 4096, hugePages: 8, floor: { case: 'local', pages: 4096 }, ratio: { p50: Number }, regionTimeRatio: Number },
        '2 MiB faults beside the floor',
      );
    } else if (r.case === 'minor') {
      t.match(r, { pages: 4096, floor: { case: 'local' }, ratio: { p50: Number, p99: Number } }, 'minor faults beside the floor local case');
      t.equal(r.minorFaults, 4096, 'every first touch was a minor fault on a cached page');
    } else {
      t.equal(r.digestMatch, true, `${r.case}: every run byte-exact`);
      t.ok(r.workingSetPages > 0, `${r.case}: a working set was recorded (${r.workingSetPages} pages)`);
      t.equal(r.with.pagesPrefetched > 0, true, `${r.case}: the replay installed pages`);
      t.type(r.faultsRatio, 'number');
      t.type(r.timeRatio, 'number');
    }
  }
  t.match(localTable(results), /\| cold-start-unix \| demand faults \|/);
});

t.test('bench localhost runs end to end: every case byte-exact, with the fields scripts read', async (t) => {
  const results = await localhostBench(4096 * 4096, 1024 * 4096, [2], () => {});
  t.same(
    results.map((r) => r.case),
    ['copy', 'release-as-sent', 'in-place', 'clones'],
  );
  for (const r of results) {
    t.equal(r.digestMatch, true, `${r.case}: byte-exact`);
    t.type(r.peakMemoryRatio, 'number');
    if (r.case === 'clones') {
      t.match(r, { clones: 2, totalMemoryRatio: Number, pagesFetchedRatio: Number, withoutTemplate: { digestMatch: true, pagesFetchedRatio: Number } });
      t.ok(r.pagesFetchedRatio <= 1, `a template fetches each page at most once for both clones (${r.pagesFetchedRatio})`);
      t.ok(r.withoutTemplate.pagesFetchedRatio >= 2, `two plain sessions fetch the image twice (${r.withoutTemplate.pagesFetchedRatio})`);
    }
  }
  t.match(localhostTable(results), /clones x2 \(template\)/);
});

t.test('bench live runs end to end: the three modes side by side, byte-exact, with the fields scripts read', async (t) => {
  const results = await liveBench(1024, [0.1], () => {});
  t.same(
    results.map((r) => r.mode),
    ['postcopy', 'precopy+postcopy', 'precopy'],
  );
  for (const r of results) {
    t.match(r, { writeRate: 0.1, pauseMs: Number, totalMs: Number, bytesSent: Number, faultsFirstSecond: Number, digestMatch: true }, `${r.mode}: byte-exact`);
    t.ok(r.bytesSent >= 1024 * 4096 * 0.9, `${r.mode}: the pages crossed (${r.bytesSent} bytes)`);
  }
  t.equal(results[0].rounds, 0, 'pure postcopy sends no round');
  t.ok(results[1].rounds >= 1 && results[2].rounds >= 1, 'the others precopy first');
  t.equal(results[2].pagesDiscarded, 0, 'precopy alone leaves nothing stale');
  t.match(liveTable(results), /precopy\+postcopy/);
});

t.test('bench qemu runs end to end: our lazy restore beside QEMU own, the guest clean after both', async (t) => {
  const result = await qemuBench(16, 1, () => {});
  t.match(result, {
    guestMemMib: 16,
    rounds: 1,
    ours: { runningMs: Number, completeMs: Number, requests: Number },
    qemu: { runningMs: Number },
    ratio: { running: Number, complete: Number },
  });
  t.equal(result.guestChecksClean, true, 'every restored guest checked its memory and saw no error');
  t.ok(result.ours.runningMs <= result.ours.completeMs, 'ours: the guest runs before its memory has all arrived');
});

t.test('bench store runs end to end on the real RGW: dedup of 21 images and of the QEMU guest saved twice, cold faults, full residency', async (t) => {
  storeEnv();
  const run = await runCli(['bench', 'store', '--pages', '4096', '--chunk-sizes', '64K', '--cases', 'dedup,guest,cold,full', '--json']);
  t.equal(run.code, 0, run.stderr.slice(-500));
  const results = run.stdout
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  t.same(
    results.map((r) => r.case),
    ['dedup', 'cold', 'full', 'guest'],
    'one line per case, in order',
  );
  const [dedup, cold, full, guest] = results;
  t.ok(dedup.storedBytesRatio > 0 && dedup.storedBytes <= dedup.baseBytes + dedup.differingBytes, `dedup: ${dedup.storedBytesRatio}`);
  t.ok(guest.differingBytes > 0, `the guest changed ${guest.differingBytes} bytes between its saves`);
  t.ok(guest.secondUploadedBytes < guest.firstUploadedBytes, 'the second save uploaded less than the first: the chunks it shares were not sent again');
  t.ok(guest.storedBytes >= guest.firstStoredBytes + guest.secondUploadedBytes - 1024 ** 2, 'stored: both saves, shared chunks once');
  t.ok(cold.ours.count > 0 && cold.ratio.p50 > 0, `cold: ${cold.ours.count} faults, p50 ratio ${cold.ratio.p50}`);
  t.ok(full.ratio > 0, `full: ${full.ratio}`);
});

/** The command lines of the processes running now that mention `text`. */
function processesNaming(text: string): string[] {
  return readdirSync('/proc')
    .filter((pid) => /^\d+$/.test(pid))
    .map((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8').replaceAll('\0', ' ');
      } catch {
        return ''; // gone meanwhile
      }
    })
    .filter((cmdline) => cmdline.includes(text));
}

t.test('a bench stopped by SIGTERM or SIGINT leaves neither its scratch directory in /dev/shm nor a process it started', async (t) => {
  const cases = [
    {
      name: 'the suite',
      args: ['bench', '--link', 'unix', '--pages', '1024', '--out', tempDir(t)],
      prefix: 'postcopy-bench-',
      signal: 'SIGTERM' as const,
      child: false,
    },
    {
      name: 'bench localhost',
      args: ['bench', 'localhost', '--pages', '4096', '--clones', '1'],
      prefix: 'uffd-postcopy-bench-',
      signal: 'SIGINT' as const,
      child: true,
    },
  ];
  for (const { name, args, prefix, signal, child } of cases) {
    const before = new Set(readdirSync('/dev/shm'));
    const bench = spawnCli(t, args);
    // Other benches may run on this host meanwhile: the directories that count are this one's (named with its pid).
    const created = () => readdirSync('/dev/shm').filter((name) => !before.has(name) && name.startsWith(`${prefix}${bench.child.pid}-`));
    const [dir] = await until(`${name}: its scratch directory in /dev/shm`, () => created().length > 0 && created());
    // The localhost bench is stopped while it moves an image: its source (a serve of an image in that directory) runs.
    if (child) await until(`${name}: the source it started`, () => processesNaming(join('/dev/shm', dir)).length > 0);
    bench.child.kill(signal);
    const end = await bench.exited;
    t.equal(end.code, 128 + osConstants.signals[signal], `${name}: ended by ${signal} (exit 128 + its number)`);
    t.same(created(), [], `${name}: no new /dev/shm/${prefix}* is left`);
    if (child) await until(`${name}: no process it started still runs`, () => processesNaming(join('/dev/shm', dir)).length === 0, 10_000);
  }
});

t.test('bench compression runs end to end: a synthetic image across a 1 Gbit/s link, packed and not, with the fields scripts read', async (t) => {
  const { compressionBench, compressionTable } = await import('../bench/compression.js');
  const [r] = await compressionBench(2048, 1, ['synthetic']);
  if ('skipped' in r) {
    t.comment(`skipped: ${r.skipped}`);
    return;
  }
  t.match(r, {
    case: 'compression',
    image: 'synthetic',
    link: 'veth-1g',
    rawBytes: 2048 * 4096,
    rounds: 1,
    wireBytesRatio: Number,
    plainWireBytesRatio: Number,
    timeRatio: Number,
  });
  t.ok(
    r.wireBytesRatio < r.plainWireBytesRatio,
    `packed runs put fewer bytes on the wire (${r.wireBytesRatio} of the image, against ${r.plainWireBytesRatio})`,
  );
  t.ok(r.runs.find((x) => x.packed)!.packedRuns > 0 && r.runs.find((x) => !x.packed)!.packedRuns === 0, 'packed in one run, refused in the other');
  t.match(compressionTable([r]), /\| synthetic \| veth-1g \| 8 \|/);
});

t.test('bench fanout runs end to end: one source process feeding restore processes at once, over a unix socket and TCP', async (t) => {
  const { fanoutBench, fanoutTable } = await import('../bench/fanout.js');
  const results = await fanoutBench(1024, 3, 1, ['unix', 'tcp']);
  t.equal(results.length, 2);
  for (const r of results) {
    t.match(r, {
      case: 'fanout',
      pages: 1024,
      destinations: 3,
      rounds: 1,
      aggregateGBps: Number,
      floorBulkGBps: Number,
      aggregateVsFloorBulk: Number,
    });
    // Null only when the lone restore had no fault to measure (the background can fill 1,024 pages first on a loaded machine).
    t.ok(
      r.faultP99VsAlone === null ? r.faultP99Us.alone === 0 : Number.isFinite(r.faultP99VsAlone),
      `${r.transport}: p99 against the lone one's: ${r.faultP99VsAlone}`,
    );
    t.ok(r.aggregateGBps > 0 && r.sourceCpuMsPerGiB.wave >= 0 && r.wallMs.wave > 0, `${r.transport}: figures measured`);
  }
  t.match(fanoutTable(results), /\| unix \| 3 \|/);
});
