// One benchmark scenario: a destination session against a running source, one
// access pattern, one transfer policy, one thread placement; every figure the
// report shows comes from here.
import { Destination } from '../client/destination.js';
import { touchPages, type TouchResult } from '../lib/workload.js';
import { cpuSince, threadSamples, type RunningSource } from './source.js';
import { splitForThreads, touchSequence, type Pattern } from './patterns.js';

export interface Policy {
  name: string;
  window: { forward: number; backward: number };
  background: boolean;
  /** Background rate cap in bytes/s (0 or absent: none). */
  rateBytesPerSecond?: number;
}

export const POLICIES: Policy[] = [
  { name: 'on-demand', window: { forward: 0, backward: 0 }, background: false },
  { name: 'window-4', window: { forward: 4, backward: 1 }, background: false },
  { name: 'window-16', window: { forward: 16, backward: 4 }, background: false },
  { name: 'window-64', window: { forward: 64, backward: 8 }, background: false },
  { name: 'background', window: { forward: 0, backward: 0 }, background: true },
  { name: 'default', window: { forward: 8, backward: 2 }, background: true },
];

export interface Placement {
  name: 'free' | 'one-cpu' | 'split';
  /** CPU for the workload thread(s) and for the destination's engine threads. */
  touchCpu?: number;
  engineCpu?: number;
}

export const FREE: Placement = { name: 'free' };

export interface ScenarioSpec {
  link: string;
  source: RunningSource;
  token?: string;
  pages: number;
  pattern: Pattern | 'none';
  threads: number;
  policy: Policy;
  placement: Placement;
  seed?: number;
}

export interface Percentiles {
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

export interface ScenarioResult {
  link: string;
  pattern: Pattern | 'none';
  threads: number;
  policy: string;
  placement: string;
  pages: number;
  /** Latency of each page's first touch, as the workload saw it (µs). */
  firstTouchUs: Percentiles & { count: number };
  /** Fault latency inside the engine, fault read to page installed (µs). */
  faultUs: Percentiles;
  faults: number;
  /** Wall time of the workload: first touch to last touch of the slowest thread (ms). */
  workloadMs: number;
  blockedMs: number;
  /** Engine start to every page resident (ms); null when the policy leaves pages behind. */
  fullResidencyMs: number | null;
  bytesDown: number;
  bytesUp: number;
  duplicatePages: number;
  cpu: { sourceMs: number; destinationMs: number };
  cpus: { workload: number[]; destination: Record<string, number>; source: Record<string, number> };
  /** [ms since start, resident pages], sampled every few ms. */
  residency: [number, number][];
  /** First-touch latency quantiles for CDF plots: [µs, fraction]. */
  cdf: [number, number][];
}

const round = (x: number, d = 2) => Math.round(x * 10 ** d) / 10 ** d;

function percentiles(sorted: Float64Array): Percentiles {
  const n = sorted.length;
  if (n === 0) return { p50: 0, p90: 0, p99: 0, max: 0 };
  const at = (q: number) => round(sorted[Math.min(n - 1, Math.floor(n * q))] / 1e3);
  return { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: round(sorted[n - 1] / 1e3) };
}

function cdfPoints(sorted: Float64Array, points = 100): [number, number][] {
  const n = sorted.length;
  if (n === 0) return [];
  const out: [number, number][] = [];
  for (let i = 1; i <= points; i++) {
    const idx = Math.min(n - 1, Math.floor((n * i) / points) - 1);
    out.push([round(sorted[Math.max(0, idx)] / 1e3, 3), i / points]);
  }
  return out;
}

/** First-touch latencies (ns), sorted: repeats of a page already touched are left out. */
function firstTouches(orders: Uint32Array[], results: TouchResult[], pages: number): Float64Array {
  const seen = new Uint8Array(pages);
  const out: number[] = [];
  // Threads ran at once; any of a page's touches may have been first, so take each page's slowest.
  const worst = new Float64Array(pages);
  orders.forEach((order, t) => {
    for (let k = 0; k < order.length; k++) {
      const p = order[k];
      const lat = results[t].latencyNs[k];
      if (!seen[p]) {
        seen[p] = 1;
        worst[p] = lat;
      } else if (lat > worst[p]) worst[p] = lat;
    }
  });
  for (let p = 0; p < pages; p++) if (seen[p]) out.push(worst[p]);
  return Float64Array.from(out).sort();
}

export async function runScenario(spec: ScenarioSpec): Promise<ScenarioResult> {
  const { policy, placement } = spec;
  const srcBefore = threadSamples(spec.source.pid);
  const dstBefore = threadSamples('self');
  const dest = await Destination.connect({
    source: spec.source.address,
    token: spec.token,
    window: policy.window,
    background: { enabled: policy.background, rateBytesPerSecond: policy.rateBytesPerSecond ?? 0 },
    // The policies are compared on the link's own bytes (the floor's image packs to almost nothing): bench compression measures packing.
    refusePackedRuns: true,
    ...(placement.engineCpu !== undefined ? { engineCpu: placement.engineCpu } : {}),
  });
  const residency: [number, number][] = [];
  const t0 = process.hrtime.bigint();
  const sample = () => residency.push([round(Number(process.hrtime.bigint() - t0) / 1e6), dest.stats().residentPages]);
  const sampler = setInterval(sample, 5);
  try {
    const region = dest.regions[0].mapping;
    const orders = spec.pattern === 'none' ? [] : splitForThreads(touchSequence(spec.pattern, spec.pages, spec.seed ?? 1), spec.threads);
    const results = await Promise.all(
      orders.map((order) => touchPages(region.address, spec.pages, order, placement.touchCpu !== undefined ? { cpu: placement.touchCpu } : {})),
    );
    for (const [t, order] of orders.entries()) {
      for (let k = 0; k < order.length; k++) {
        if (results[t].firstBytes[k] !== ((order[k] * 7 + 1) & 0xff)) throw new Error(`wrong byte in page ${order[k]}`);
      }
    }
    const complete = policy.background || dest.stats().residentPages === dest.stats().totalPages;
    if (complete) await dest.engine.whenResident();
    sample();
    const stats = dest.stats();
    // Read CPU figures while the session's threads still live.
    const srcAfter = threadSamples(spec.source.pid);
    const dstAfter = threadSamples('self');
    const sorted = firstTouches(orders, results, spec.pages);
    const lastCpu = (m: ReturnType<typeof threadSamples>, prefix: string) =>
      Object.fromEntries([...m.values()].filter((s) => s.name.startsWith(prefix)).map((s) => [s.name, s.lastCpu]));
    return {
      link: spec.link,
      pattern: spec.pattern,
      threads: spec.threads,
      policy: policy.name,
      placement: placement.name,
      pages: spec.pages,
      firstTouchUs: { ...percentiles(sorted), count: sorted.length },
      faultUs: {
        p50: round(stats.faultLatency.p50Ns / 1e3),
        p90: round(stats.faultLatency.p90Ns / 1e3),
        p99: round(stats.faultLatency.p99Ns / 1e3),
        max: round(stats.faultLatency.maxNs / 1e3),
      },
      faults: stats.faults,
      workloadMs: round(Math.max(0, ...results.map((r) => r.totalNs)) / 1e6),
      blockedMs: round(stats.blockedNs / 1e6),
      fullResidencyMs: complete ? round(stats.fullResidencyNs / 1e6) : null,
      bytesDown: stats.bytesReceived,
      bytesUp: stats.pagesRequested * 16,
      duplicatePages: stats.duplicatePages,
      cpu: {
        sourceMs: round(cpuSince(srcBefore, srcAfter) / 1e6),
        destinationMs: round(cpuSince(dstBefore, dstAfter, (n) => n.startsWith('pc-')) / 1e6),
      },
      cpus: { workload: results.map((r) => r.startCpu), destination: lastCpu(dstAfter, 'pc-'), source: lastCpu(srcAfter, 'pc-') },
      residency,
      cdf: cdfPoints(sorted),
    };
  } finally {
    clearInterval(sampler);
    dest.close();
  }
}
