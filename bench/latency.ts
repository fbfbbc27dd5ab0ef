// postcopy bench: fault latency (one thread touching every page once in the
// floor's seeded random order, pure on-demand) and background throughput (the
// whole image streamed, no faults), each beside the floor's figure for the same
// workload in the same run.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Destination } from '../client/destination.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { PAGE_SIZE } from '../lib/memory.js';
import { runFloor, type FloorBulk, type FloorLatency } from './floor.js';
import { floorImageFile, startSource, type RunningSource } from './source.js';

/** A source in its own process (as the floor's page server is), serving `pages` of the floor's image. */
function floorSource(dir: string, pages: number, transport: Transport): Promise<RunningSource> {
  return startSource(floorImageFile(dir, pages), transport === 'unix' ? `unix:${join(dir, 'source.sock')}` : 'tcp:127.0.0.1:0');
}

export type Transport = 'unix' | 'tcp';

const round = (x: number, digits = 2) => Math.round(x * 10 ** digits) / 10 ** digits;

/** Percentiles picked exactly as the floor picks them (sorted, index n*q). */
function percentiles(latencyNs: Float64Array, totalNs: number) {
  const s = Float64Array.from(latencyNs).sort();
  const n = s.length;
  return { p50_us: round(s[n >> 1] / 1e3), p90_us: round(s[Math.floor((n * 9) / 10)] / 1e3), p99_us: round(s[Math.floor((n * 99) / 100)] / 1e3), max_us: round(s[n - 1] / 1e3), total_ms: round(totalNs / 1e6, 1) };
}

export interface LatencyResult {
  case: 'latency';
  transport: Transport;
  pages: number;
  seed: number;
  ours: ReturnType<typeof percentiles>;
  handlerUs: { p50: number; p90: number; p99: number; max: number };
  touchCpu: number;
  floor: FloorLatency | null;
  ratio: { p50: number; p90: number; p99: number } | null;
}

export async function latencyBench(pages: number, transport: Transport, seed: number): Promise<LatencyResult> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-'));
  const source = await floorSource(dir, pages, transport);
  try {
    const dest = await Destination.connect({ source: source.address, token: source.token, window: { forward: 0, backward: 0 }, background: { enabled: false } });
    try {
      const region = dest.regions[0].mapping;
      const order = shuffledOrder(pages, seed);
      const touched = await touchPages(region.address, pages, order);
      for (let k = 0; k < pages; k++) {
        if (touched.firstBytes[k] !== ((order[k] * 7 + 1) & 0xff)) throw new Error(`wrong byte in page ${order[k]}`);
      }
      const report = await dest.finish();
      const ours = percentiles(touched.latencyNs, touched.totalNs);
      const floor = (await runFloor(pages, seed, [transport])).get(transport) as FloorLatency | undefined;
      return {
        case: 'latency', transport, pages, seed, ours,
        handlerUs: { p50: report.faultLatencyUs.p50, p90: report.faultLatencyUs.p90, p99: report.faultLatencyUs.p99, max: report.faultLatencyUs.max },
        touchCpu: touched.startCpu,
        floor: floor ?? null,
        ratio: floor ? { p50: round(ours.p50_us / floor.p50_us), p90: round(ours.p90_us / floor.p90_us), p99: round(ours.p99_us / floor.p99_us) } : null,
      };
    } finally {
      dest.close();
    }
  } finally {
    await source.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

export interface ThroughputResult {
  case: 'throughput';
  transport: Transport;
  pages: number;
  ours: { gbytes_per_s: number; total_ms: number };
  floor: FloorBulk | null;
  ratio: number | null;
}

export async function throughputBench(pages: number, transport: Transport): Promise<ThroughputResult> {
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-bench-'));
  const source = await floorSource(dir, pages, transport);
  try {
    const dest = await Destination.connect({ source: source.address, token: source.token, window: { forward: 0, backward: 0 }, background: { enabled: true } });
    try {
      const report = await dest.finish();
      const ns = dest.stats().fullResidencyNs;
      const ours = { gbytes_per_s: round((pages * PAGE_SIZE) / ns, 3), total_ms: round(ns / 1e6, 1) };
      const floor = (await runFloor(pages, 1, [`bulk-${transport}`])).get(`bulk-${transport}`) as FloorBulk | undefined;
      if (!report.digestMatch) throw new Error('digest mismatch');
      return { case: 'throughput', transport, pages, ours, floor: floor ?? null, ratio: floor ? round(ours.gbytes_per_s / floor.gbytes_per_s) : null };
    } finally {
      dest.close();
    }
  } finally {
    await source.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
