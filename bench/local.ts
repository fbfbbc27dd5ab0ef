// postcopy bench local: restoring on one host, against the floor's `local`
// case (a plain-C handler copying each fault from memory in its own process),
// measured in the same run:
//   image              faults served from a local image file (--image), no
//                      source process: fault latency beside the floor's local
//   cold-start-local   a cold start (lib/workload.ts coldStartOrder) from a
//   cold-start-unix    local image / a unix-socket source, with and without
//                      --prefetch of a working set recorded once beforehand:
//                      demand faults and time until the workload finishes
// Each round runs both sides back to back, alternating which goes first.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Destination, type DestinationOptions } from '../client/destination.js';
import { Image } from '../server/image.js';
import type { WorkingSet } from '../client/working-set.js';
import { coldStartOrder, touchPages } from '../lib/workload.js';
import { latencyBench, median, ratioOf, round, type LatencyResult } from './latency.js';
import { floorImageFile, startSource } from './source.js';

export interface ImageFaultResult extends Omit<LatencyResult, 'case' | 'transport'> {
  case: 'image';
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

export type LocalBenchResult = ImageFaultResult | ColdStartResult;

export async function localBench(pages: number, rounds: number, seed: number, progress: (line: string) => void = () => {}): Promise<LocalBenchResult[]> {
  progress(`image: fault latency from a local image file, ${pages} pages, ${rounds} rounds`);
  const { transport: _, ...latency } = await latencyBench(pages, 'image', seed, rounds);
  const results: LocalBenchResult[] = [{ ...latency, case: 'image' }];
  for (const where of ['local', 'unix'] as const) {
    progress(`cold-start-${where}: record once, then ${rounds} rounds with and without --prefetch`);
    results.push(await coldStartBench(pages, rounds, where));
  }
  return results;
}

async function coldStartBench(pages: number, rounds: number, where: 'local' | 'unix'): Promise<ColdStartResult> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-'));
  const path = floorImageFile(dir, pages);
  const image = where === 'local' ? Image.open([{ path }]) : null;
  const source = where === 'unix' ? await startSource(path, `unix:${join(dir, 'source.sock')}`) : null;
  const from: DestinationOptions = image ? { image } : { source: source!.address };
  try {
    const set = await recordOnce(from, pages);
    const without: ColdStartRun[] = [];
    const withSet: ColdStartRun[] = [];
    for (let r = 0; r < rounds; r++) {
      // Each round is a new run of the same "function": the same set, a new order and new extra pages.
      const seed = 100 + r;
      if (r % 2 === 0) {
        without.push(await coldStart(from, pages, seed));
        withSet.push(await coldStart({ ...from, prefetch: set }, pages, seed));
      } else {
        withSet.push(await coldStart({ ...from, prefetch: set }, pages, seed));
        without.push(await coldStart(from, pages, seed));
      }
    }
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
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The recording run (as --record-working-set does it): faults served alone, the background after the workload. */
async function recordOnce(from: DestinationOptions, pages: number): Promise<WorkingSet> {
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

async function coldStart(from: DestinationOptions, pages: number, seed: number): Promise<ColdStartRun> {
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
    if (r.case === 'image') {
      lines.push(`| image | fault p50 | ${r.ours.p50_us} µs | floor local ${r.floor.p50_us} µs | ${r.ratio.p50} (${r.spread.p50.join('-')}) |`);
      lines.push(`| image | fault p99 | ${r.ours.p99_us} µs | floor local ${r.floor.p99_us} µs | ${r.ratio.p99} (${r.spread.p99.join('-')}) |`);
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
