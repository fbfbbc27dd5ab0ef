// postcopy bench: fault latency (one thread touching every page once in the
// floor's seeded random order, pure on-demand) and background throughput (the
// whole image streamed, no faults), each beside the floor's figure for the same
// workload in the same run.
import { join } from 'node:path';
import { Destination } from '../client/destination.js';
import { Image } from '../lib/image.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { PAGE_SIZE } from '../lib/memory.js';
import { runFloor, type FloorBulk, type FloorLatency } from './floor.js';
import { floorImageFile, startSource, type RunningSource } from './source.js';
import { removeScratchDir, scratchDir } from './cleanup.js';

/** A source in its own process (as the floor's page server is), serving `pages` of the floor's image. */
function floorSource(dir: string, pages: number, transport: 'unix' | 'tcp'): Promise<RunningSource> {
  return startSource(floorImageFile(dir, pages), transport === 'unix' ? `unix:${join(dir, 'source.sock')}` : 'tcp:127.0.0.1:0');
}

/** Where the pages come from: a source process over a unix socket or TCP, or the image file in the faulting process (beside the floor's `local`). */
export type Transport = 'unix' | 'tcp' | 'image';

/** The floor's case for the same workload. */
const floorCase = (transport: Transport) => (transport === 'image' ? 'local' : transport);

/** x rounded to `digits` decimals (figures as the benchmarks print them). */
export const round = (x: number, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits;

/** Percentiles picked exactly as the floor picks them (sorted, index n*q). */
export function percentiles(latencyNs: Float64Array, totalNs: number) {
  const s = Float64Array.from(latencyNs).sort();
  const n = s.length;
  return {
    p50_us: round(s[n >> 1] / 1e3),
    p90_us: round(s[Math.floor((n * 9) / 10)] / 1e3),
    p99_us: round(s[Math.floor((n * 99) / 100)] / 1e3),
    max_us: round(s[n - 1] / 1e3),
    total_ms: round(totalNs / 1e6, 1),
  };
}

/** The median of each numeric field over several runs of the same shape. */
export function medianOf<T extends object>(runs: T[]): T {
  const out: Record<string, unknown> = { ...(runs[0] as Record<string, unknown>) };
  for (const [k, v] of Object.entries(runs[0])) if (typeof v === 'number') out[k] = median(runs.map((r) => (r as Record<string, number>)[k]));
  return out as T;
}
/** The middle value (the upper one of an even count). */
export const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
/**
 * Runs `a` and `b` once per round, alternating which goes first, so neither
 * always runs on a warmer (or busier) machine; their results in round order.
 */
export async function interleaved<A, B>(rounds: number, a: (round: number) => Promise<A>, b: (round: number) => Promise<B>): Promise<{ a: A[]; b: B[] }> {
  const out: { a: A[]; b: B[] } = { a: [], b: [] };
  for (let r = 0; r < rounds; r++) {
    if (r % 2 === 0) {
      out.a.push(await a(r));
      out.b.push(await b(r));
    } else {
      out.b.push(await b(r));
      out.a.push(await a(r));
    }
  }
  return out;
}

/** Median of per-pair ratios, with their spread: these machines drift, so one pair is not a ratio. */
export function ratioOf(pairs: number[]): { median: number; spread: [number, number] } {
  return { median: round(median(pairs)), spread: [round(Math.min(...pairs)), round(Math.max(...pairs))] };
}

export interface LatencyResult {
  case: 'latency';
  transport: Transport;
  pages: number;
  seed: number;
  /** Interleaved pairs (ours, floor, then floor, ours, ...). */
  rounds: number;
  /** Medians over the rounds. */
  ours: ReturnType<typeof percentiles>;
  handlerUs: { p50: number; p90: number; p99: number; max: number };
  touchCpu: number;
  floor: FloorLatency;
  /** Medians of the per-round ratios ours / floor. */
  ratio: { p50: number; p90: number; p99: number };
  /** The smallest and largest per-round ratio. */
  spread: { p50: [number, number]; p90: [number, number]; p99: [number, number] };
}

async function oursLatencyOnce(pages: number, transport: Transport, seed: number) {
  const dir = scratchDir('postcopy-bench-');
  const image = transport === 'image' ? Image.open([{ path: floorImageFile(dir, pages) }]) : null;
  const source = transport === 'image' ? null : await floorSource(dir, pages, transport);
  try {
    const pure = { window: { forward: 0, backward: 0 }, background: { enabled: false } };
    const dest = await Destination.connect(image ? { image, ...pure } : { source: source!.address, token: source!.token, ...pure });
    try {
      const region = dest.regions[0].mapping;
      const order = shuffledOrder(pages, seed);
      const touched = await touchPages(region.address, pages, order);
      for (let k = 0; k < pages; k++) {
        if (touched.firstBytes[k] !== ((order[k] * 7 + 1) & 0xff)) throw new Error(`wrong byte in page ${order[k]}`);
      }
      const report = await dest.finish();
      const l = report.faultLatencyUs;
      return {
        ours: percentiles(touched.latencyNs, touched.totalNs),
        handlerUs: { p50: l.p50, p90: l.p90, p99: l.p99, max: l.max },
        touchCpu: touched.startCpu,
      };
    } finally {
      dest.close();
    }
  } finally {
    await source?.close();
    image?.close();
    removeScratchDir(dir);
  }
}

export async function latencyBench(pages: number, transport: Transport, seed: number, rounds = 3): Promise<LatencyResult> {
  const { a: ours, b: floors } = await interleaved(
    rounds,
    () => oursLatencyOnce(pages, transport, seed),
    async () => (await runFloor(pages, seed, [floorCase(transport)])).get(floorCase(transport)) as FloorLatency,
  );
  const q = (k: 'p50' | 'p90' | 'p99') => ratioOf(ours.map((o, i) => o.ours[`${k}_us`] / floors[i][`${k}_us`]));
  const [p50, p90, p99] = [q('p50'), q('p90'), q('p99')];
  return {
    case: 'latency',
    transport,
    pages,
    seed,
    rounds,
    ours: medianOf(ours.map((o) => o.ours)),
    handlerUs: medianOf(ours.map((o) => o.handlerUs)),
    touchCpu: ours[ours.length - 1].touchCpu,
    floor: medianOf(floors),
    ratio: { p50: p50.median, p90: p90.median, p99: p99.median },
    spread: { p50: p50.spread, p90: p90.spread, p99: p99.spread },
  };
}

export interface ThroughputResult {
  case: 'throughput';
  transport: Transport;
  pages: number;
  rounds: number;
  /** Medians over the rounds. */
  ours: { gbytes_per_s: number; total_ms: number };
  floor: FloorBulk;
  /** Median of the per-round ratios ours / floor, and their spread. */
  ratio: number;
  spread: [number, number];
}

async function oursThroughputOnce(pages: number, transport: 'unix' | 'tcp') {
  const dir = scratchDir('postcopy-bench-');
  const source = await floorSource(dir, pages, transport);
  try {
    const dest = await Destination.connect({ source: source.address, token: source.token, window: { forward: 0, backward: 0 }, background: { enabled: true } });
    try {
      const report = await dest.finish();
      if (!report.digestMatch) throw new Error('digest mismatch');
      const ns = dest.stats().fullResidencyNs;
      return { gbytes_per_s: round((pages * PAGE_SIZE) / ns, 3), total_ms: round(ns / 1e6, 1) };
    } finally {
      dest.close();
    }
  } finally {
    await source.close();
    removeScratchDir(dir);
  }
}

export async function throughputBench(pages: number, transport: 'unix' | 'tcp', rounds = 3): Promise<ThroughputResult> {
  const { a: ours, b: floors } = await interleaved(
    rounds,
    () => oursThroughputOnce(pages, transport),
    async () => (await runFloor(pages, 1, [`bulk-${transport}`])).get(`bulk-${transport}`) as FloorBulk,
  );
  const ratio = ratioOf(ours.map((o, i) => o.gbytes_per_s / floors[i].gbytes_per_s));
  return { case: 'throughput', transport, pages, rounds, ours: medianOf(ours), floor: medianOf(floors), ratio: ratio.median, spread: ratio.spread };
}

/** The latency and throughput results as a table: ours beside the floor, and the median ratio with its spread over the rounds. */
export function latencyTable(results: (LatencyResult | ThroughputResult)[]): string {
  const lines = ['| benchmark | transport | figure | ours | floor | ratio (median, spread) |', '| --- | --- | --- | --- | --- | --- |'];
  for (const r of results) {
    if (r.case === 'latency') {
      for (const p of ['p50', 'p99'] as const)
        lines.push(
          `| latency | ${r.transport} | fault ${p} | ${r.ours[`${p}_us`]} µs | ${r.floor[`${p}_us`]} µs (${r.floor.case}) | ${r.ratio[p]} (${r.spread[p].join('-')}) |`,
        );
    } else {
      lines.push(
        `| throughput | ${r.transport} | bulk | ${r.ours.gbytes_per_s} GB/s | ${r.floor.gbytes_per_s} GB/s (${r.floor.case}) | ${r.ratio} (${r.spread.join('-')}) |`,
      );
    }
  }
  return lines.join('\n') + '\n';
}
