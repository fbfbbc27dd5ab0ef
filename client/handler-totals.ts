// Running totals over a handler's VMM sessions (a Prometheus counter each).
import { LATENCY_BOUNDS_S } from '../lib/metrics.js';
import type { DestinationStats } from '../lib/native.js';

/** The histogram's bounds in ns, and one past them all: the count comes from the same read as the buckets, so they always agree. */
export const LATENCY_BOUNDS_NS = [...LATENCY_BOUNDS_S.map((s) => s * 1e9), Infinity];

/**
 * Running totals over VMM sessions (a Prometheus counter each). The pages
 * installed are split by why they came (on demand, window, working set,
 * background): each page installed counts under one of the four. Zero pages
 * are some of those; duplicates are not installed.
 */
export interface HandlerTotals {
  faults: number;
  pagesOnDemand: number;
  pagesWindow: number;
  pagesPrefetched: number;
  pagesBackground: number;
  zeroPages: number;
  duplicatePages: number;
  bytesReceived: number;
  latencyBuckets: number[];
  latencyCount: number;
  latencySumNs: number;
}

/** VmmHandler.figures(): sessions by state now (every state, 0 when none is in it), totals since start, errors by code. */
export interface HandlerFigures {
  sessions: Record<string, number>;
  totals: HandlerTotals;
  errors: [string, number][];
}

export function emptyTotals(): HandlerTotals {
  return {
    faults: 0,
    pagesOnDemand: 0,
    pagesWindow: 0,
    pagesPrefetched: 0,
    pagesBackground: 0,
    zeroPages: 0,
    duplicatePages: 0,
    bytesReceived: 0,
    latencyBuckets: LATENCY_BOUNDS_S.map(() => 0),
    latencyCount: 0,
    latencySumNs: 0,
  };
}

export function addTotals(t: HandlerTotals, s: DestinationStats, buckets: number[]): void {
  t.faults += s.faults;
  t.pagesOnDemand += s.pagesInstalledRequested;
  t.pagesWindow += s.pagesInstalledWindow;
  t.pagesPrefetched += s.pagesInstalledPrefetch;
  t.pagesBackground += s.pagesInstalledBackground;
  t.zeroPages += s.zeroPages;
  t.duplicatePages += s.duplicatePages;
  t.bytesReceived += s.bytesReceived;
  buckets.slice(0, -1).forEach((n, i) => (t.latencyBuckets[i] += n));
  t.latencyCount += buckets[buckets.length - 1];
  t.latencySumNs += s.faultLatency.sumNs;
}
