// postcopy bench local: restoring on one host, against the floor's `local`
// case (a plain-C handler copying each fault from memory in its own process),
// measured in the same run:
//   image              faults served from a local image file (--image), no
//                      source process: fault latency beside the floor's local
//   hugetlb            2 MiB huge-page memory (MAP_HUGETLB) from the 4 KiB-page
//                      image: each fault installs a whole huge page; besides
//                      the per-fault ratio, the whole region's time over the
//                      floor's for the same bytes (it faults 512x fewer times)
//   minor              MINOR mode: memory that is a shared memfd, its pages
//                      already put in the page cache from the image; each
//                      fault is answered with UFFDIO_CONTINUE (nothing copied)
//   cold-start-local   a cold start (lib/workload.ts coldStartOrder) from a
//   cold-start-unix    local image / a unix-socket source, with and without
//                      --prefetch of a working set recorded once beforehand:
//                      demand faults and time until the workload finishes
// Each round runs both sides back to back, alternating which goes first.
import { closeSync, ftruncateSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Destination, type DestinationOptions } from '../client/destination.js';
import { Image } from '../lib/image.js';
import type { WorkingSet } from '../client/working-set.js';
import { coldStartOrder, shuffledOrder, touchPages } from '../lib/workload.js';
import { interleaved, latencyBench, median, medianOf, percentiles, ratioOf, round, type LatencyResult } from './latency.js';
import { runFloor, type FloorLatency } from './floor.js';
import { FaultEngine } from '../client/fault-engine.js';
import { Userfaultfd } from '../lib/uffd.js';
import { PAGE_SIZE, mapAnonymous, mapFile, memfdCreate, type Mapping } from '../lib/memory.js';
import { floorImageFile, startSource } from './source.js';
import { counted } from '../lib/words.js';
import { removeScratchDir, scratchDir } from './cleanup.js';

export interface ImageFaultResult extends Omit<LatencyResult, 'case' | 'transport'> {
  case: 'image';
}

export interface MinorFaultResult {
  case: 'minor';
  pages: number;
  rounds: number;
  /** Medians over the rounds: the workload thread's first touches, all minor faults. */
  ours: ReturnType<typeof percentiles>;
  floor: FloorLatency;
  /** Medians of the per-round ratios ours / the floor's local. */
  ratio: { p50: number; p99: number };
  spread: { p50: [number, number]; p99: [number, number] };
  /** Faults answered with UFFDIO_CONTINUE in the last round (every page). */
  minorFaults: number;
}

export interface ColdStartRun {
  /** Pages installed because a thread faulted on them. */
  demandFaults: number;
  /** Time until the cold start's last touch. */
  workloadMs: number;
  pagesPrefetched: number;
  digestMatch: boolean;
}

export interface ColdStartResult {
  case: 'cold-start-local' | 'cold-start-unix';
  pages: number;
  rounds: number;
  /** Pages in the recorded working set. */
  workingSetPages: number;
  /** Medians over the rounds. */
  without: ColdStartRun;
  with: ColdStartRun;
  /** Medians of the per-round ratios, with --prefetch over without. */
  faultsRatio: number;
  timeRatio: number;
  spread: { faults: [number, number]; time: [number, number] };
  digestMatch: boolean;
}

export interface HugetlbFaultResult extends Omit<MinorFaultResult, 'case' | 'minorFaults'> {
  case: 'hugetlb';
  /** Huge pages faulted in (each 2 MiB). */
  hugePages: number;
  /** The whole region restored by faults, ours (2 MiB faults) over the floor's (4 KiB faults): medians of per-round ratios. */
  regionTimeRatio: number;
}

export type LocalBenchResult = ImageFaultResult | MinorFaultResult | HugetlbFaultResult | ColdStartResult;

export async function localBench(pages: number, rounds: number, seed: number, progress: (line: string) => void = () => {}): Promise<LocalBenchResult[]> {
  progress(`image: fault latency from a local image file, ${counted(pages, 'page')}, ${counted(rounds, 'round')}`);
  const { transport: _, ...latency } = await latencyBench(pages, 'image', seed, rounds);
  const results: LocalBenchResult[] = [{ ...latency, case: 'image' }];
  progress(`minor: MINOR faults on cached pages of a shared memfd, ${counted(pages, 'page')}, ${counted(rounds, 'round')}`);
  results.push(await minorBench(pages, rounds, seed));
  progress(`hugetlb: 2 MiB faults from the 4 KiB-page image, ${counted(pages / 512, 'huge page')}, ${counted(rounds, 'round')}`);
  const huge = await hugetlbBench(pages, rounds, seed);
  if (huge) results.push(huge);
  else progress('hugetlb: skipped (this machine cannot reserve the huge pages: vm.nr_hugepages)');
  for (const where of ['local', 'unix'] as const) {
    progress(`cold-start-${where}: record once, then ${counted(rounds, 'round')} with and without --prefetch`);
    results.push(await coldStartBench(pages, rounds, where));
  }
  return results;
}

async function coldStartBench(pages: number, rounds: number, where: 'local' | 'unix'): Promise<ColdStartResult> {
  const dir = scratchDir('postcopy-bench-');
  const path = floorImageFile(dir, pages);
  const image = where === 'local' ? Image.open([{ path }]) : null;
  const source = where === 'unix' ? await startSource(path, `unix:${join(dir, 'source.sock')}`) : null;
  const from: DestinationOptions = image ? { image } : { source: source!.address };
  try {
    const set = await recordOnce(from, pages);
    // Each round is a new run of the same "function": the same set, a new order and new extra pages.
    const { a: without, b: withSet } = await interleaved(
      rounds,
      (r) => coldStart(from, pages, 100 + r),
      (r) => coldStart({ ...from, prefetch: set }, pages, 100 + r),
    );
    const faults = ratioOf(withSet.map((w, i) => w.demandFaults / Math.max(1, without[i].demandFaults)));
    const time = ratioOf(withSet.map((w, i) => w.workloadMs / without[i].workloadMs));
    const mid = (runs: ColdStartRun[]): ColdStartRun => ({
      demandFaults: median(runs.map((x) => x.demandFaults)),
      workloadMs: median(runs.map((x) => x.workloadMs)),
      pagesPrefetched: median(runs.map((x) => x.pagesPrefetched)),
      digestMatch: runs.every((x) => x.digestMatch),
    });
    return {
      case: `cold-start-${where}`,
      pages,
      rounds,
      workingSetPages: set.entries.length / 8,
      without: mid(without),
      with: mid(withSet),
      faultsRatio: faults.median,
      timeRatio: time.median,
      spread: { faults: faults.spread, time: time.spread },
      digestMatch: [...without, ...withSet].every((x) => x.digestMatch),
    };
  } finally {
    await source?.close();
    image?.close();
    removeScratchDir(dir);
  }
}

/**
 * MINOR faults: a memfd mapped shared is the memory, registered for MISSING
 * and MINOR faults; the engine fills its page cache from the image through a
 * second mapping (the background), then one thread touches every page once in
 * the floor's order: each first touch is a minor fault, mapped with
 * UFFDIO_CONTINUE. Beside the floor's local case (UFFDIO_COPY per fault).
 */
async function minorBench(pages: number, rounds: number, seed: number): Promise<MinorFaultResult> {
  const dir = scratchDir('postcopy-bench-');
  const image = Image.open([{ path: floorImageFile(dir, pages) }]);
  const ours: ReturnType<typeof percentiles>[] = [];
  const floors: FloorLatency[] = [];
  let minorFaults = 0;
  const oursOnce = async () => {
    const length = pages * PAGE_SIZE;
    const memfd = memfdCreate('bench-guest');
    const uffd = Userfaultfd.open({ nonBlocking: true });
    let guest: Mapping | null = null;
    let fill: Mapping | null = null;
    let engine: FaultEngine | null = null;
    try {
      ftruncateSync(memfd, length);
      guest = mapFile(memfd, length, { shared: true });
      fill = mapFile(memfd, length, { shared: true });
      uffd.handshake(['MINOR_SHMEM']);
      uffd.register(guest.address, length, ['missing', 'minor']);
      engine = new FaultEngine({
        uffd: uffd.fd,
        regions: [{ base: guest.address, length, pageSize: PAGE_SIZE, fillAddress: fill.address }],
        local: { image: image.regions.map((r) => r.spec), window: { forward: 0, backward: 0 }, background: true },
      });
      engine.start();
      await engine.whenResident(); // every page is in the page cache, none mapped in `guest`
      const order = shuffledOrder(pages, seed);
      const touched = await touchPages(guest.address, pages, order, { mapping: guest });
      for (let k = 0; k < pages; k++) if (touched.firstBytes[k] !== ((order[k] * 7 + 1) & 0xff)) throw new Error(`wrong byte in page ${order[k]}`);
      minorFaults = engine.stats().minorFaults;
      ours.push(percentiles(touched.latencyNs, touched.totalNs));
    } finally {
      engine?.stop();
      uffd.close();
      guest?.unmap();
      fill?.unmap();
      closeSync(memfd);
    }
  };
  const floorOnce = async () => void floors.push((await runFloor(pages, seed, ['local'])).get('local') as FloorLatency);
  try {
    await interleaved(rounds, oursOnce, floorOnce);
  } finally {
    image.close();
    removeScratchDir(dir);
  }
  const p50 = ratioOf(ours.map((o, i) => o.p50_us / floors[i].p50_us));
  const p99 = ratioOf(ours.map((o, i) => o.p99_us / floors[i].p99_us));
  return {
    case: 'minor',
    pages,
    rounds,
    ours: medianOf(ours),
    floor: medianOf(floors),
    ratio: { p50: p50.median, p99: p99.median },
    spread: { p50: p50.spread, p99: p99.spread },
    minorFaults,
  };
}

const HUGE_PAGE = 2 << 20;
const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages';

/** 2 MiB faults: reserves the huge pages it needs (and gives them back); null when the machine cannot. */
async function hugetlbBench(pages: number, rounds: number, seed: number): Promise<HugetlbFaultResult | null> {
  const length = Math.floor((pages * PAGE_SIZE) / HUGE_PAGE) * HUGE_PAGE;
  const huge = length / HUGE_PAGE;
  if (huge === 0) return null;
  let before: number;
  try {
    before = Number(readFileSync(NR_HUGEPAGES, 'utf8'));
    writeFileSync(NR_HUGEPAGES, String(before + huge));
  } catch {
    return null;
  }
  const dir = scratchDir('postcopy-bench-');
  const image = Image.open([{ path: floorImageFile(dir, length / PAGE_SIZE) }]);
  const ours: ReturnType<typeof percentiles>[] = [];
  const floors: FloorLatency[] = [];
  const oursOnce = async () => {
    const uffd = Userfaultfd.open({ nonBlocking: true });
    let memory: Mapping | null = null;
    let engine: FaultEngine | null = null;
    try {
      memory = mapAnonymous(length, { hugetlb: true });
      uffd.handshake([]);
      uffd.register(memory.address, length, ['missing']);
      engine = new FaultEngine({
        uffd: uffd.fd,
        regions: [{ base: memory.address, length, pageSize: HUGE_PAGE }],
        sourceRegions: [{ pages: length / PAGE_SIZE, pageSize: PAGE_SIZE }],
        local: { image: image.regions.map((r) => r.spec), window: { forward: 0, backward: 0 }, background: false },
      });
      engine.start();
      const order = shuffledOrder(huge, seed);
      const touched = await touchPages(memory.address, huge, order, { pageSize: HUGE_PAGE, mapping: memory });
      for (let k = 0; k < huge; k++) if (touched.firstBytes[k] !== ((order[k] * 512 * 7 + 1) & 0xff)) throw new Error(`wrong byte in huge page ${order[k]}`);
      ours.push(percentiles(touched.latencyNs, touched.totalNs));
    } finally {
      engine?.stop();
      uffd.close();
      memory?.unmap();
    }
  };
  const floorOnce = async () => void floors.push((await runFloor(length / PAGE_SIZE, seed, ['local'])).get('local') as FloorLatency);
  try {
    await interleaved(rounds, oursOnce, floorOnce);
  } finally {
    image.close();
    removeScratchDir(dir);
    writeFileSync(NR_HUGEPAGES, String(before));
  }
  const p50 = ratioOf(ours.map((o, i) => o.p50_us / floors[i].p50_us));
  const p99 = ratioOf(ours.map((o, i) => o.p99_us / floors[i].p99_us));
  const region = ratioOf(ours.map((o, i) => o.total_ms / floors[i].total_ms));
  return {
    case: 'hugetlb',
    pages: length / PAGE_SIZE,
    hugePages: huge,
    rounds,
    ours: medianOf(ours),
    floor: medianOf(floors),
    ratio: { p50: p50.median, p99: p99.median },
    spread: { p50: p50.spread, p99: p99.spread },
    regionTimeRatio: region.median,
  };
}

/** The recording run (as --record-working-set does it): faults served alone, the background after the workload. */
export async function recordOnce(from: DestinationOptions, pages: number): Promise<WorkingSet> {
  const dest = await Destination.connect({ ...from, window: { forward: 0, backward: 0 }, holdBackground: true, recordWorkingSet: true });
  try {
    const r = dest.regions[0].mapping;
    await touchPages(r.address, pages, coldStartOrder(pages, 1), { mapping: r });
    dest.session.startBackground();
    await dest.finish();
    return dest.workingSet();
  } finally {
    dest.close();
  }
}

export async function coldStart(from: DestinationOptions, pages: number, seed: number): Promise<ColdStartRun> {
  const dest = await Destination.connect(from);
  try {
    const r = dest.regions[0].mapping;
    const order = coldStartOrder(pages, seed);
    const touched = await touchPages(r.address, pages, order, { mapping: r });
    for (let k = 0; k < order.length; k++) {
      if (touched.firstBytes[k] !== ((order[k] * 7 + 1) & 0xff)) throw new Error(`wrong byte in page ${order[k]}`);
    }
    const report = await dest.finish();
    return {
      demandFaults: report.pagesOnDemand,
      workloadMs: round(touched.totalNs / 1e6, 2),
      pagesPrefetched: report.pagesPrefetched,
      digestMatch: report.digestMatch === true,
    };
  } finally {
    dest.close();
  }
}

/** The Markdown table of a run. */
export function localTable(results: LocalBenchResult[]): string {
  const lines = ['| case | figure | ours | baseline | ratio (median, spread) |', '| --- | --- | --- | --- | --- |'];
  for (const r of results) {
    if (r.case === 'hugetlb') {
      lines.push(
        `| hugetlb | fault p50 (2 MiB) | ${r.ours.p50_us} µs | floor local ${r.floor.p50_us} µs (4 KiB) | ${r.ratio.p50} (${r.spread.p50.join('-')}) |`,
      );
      lines.push(`| hugetlb | whole region by faults | ${r.ours.total_ms} ms | floor local ${r.floor.total_ms} ms | ${r.regionTimeRatio} |`);
    } else if (r.case === 'image' || r.case === 'minor') {
      lines.push(`| ${r.case} | fault p50 | ${r.ours.p50_us} µs | floor local ${r.floor.p50_us} µs | ${r.ratio.p50} (${r.spread.p50.join('-')}) |`);
      lines.push(`| ${r.case} | fault p99 | ${r.ours.p99_us} µs | floor local ${r.floor.p99_us} µs | ${r.ratio.p99} (${r.spread.p99.join('-')}) |`);
    } else {
      lines.push(
        `| ${r.case} | demand faults | ${r.with.demandFaults} with --prefetch | ${r.without.demandFaults} without | ${r.faultsRatio} (${r.spread.faults.join('-')}) |`,
      );
      lines.push(
        `| ${r.case} | workload ms | ${r.with.workloadMs} with --prefetch | ${r.without.workloadMs} without | ${r.timeRatio} (${r.spread.time.join('-')}) |`,
      );
    }
  }
  return lines.join('\n') + '\n';
}
