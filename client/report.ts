// Turns the engine's native counters into the report people and scripts read.
import type { DestinationStats } from '../lib/native.js';
import type { TransferOptions } from '../lib/transfer.js';

export interface RestoreReport {
  pages: number;
  bytes: number;
  faults: number;
  /** MINOR mode: faults on pages already in the guest's memory file, answered by mapping them (nothing copied). */
  minorFaults: number;
  pagesOnDemand: number;
  pagesWindow: number;
  pagesBackground: number;
  /** Pages of a replayed working set installed before any thread faulted on them. */
  pagesPrefetched: number;
  zeroPages: number;
  duplicatePages: number;
  /** With transparentHugePages (restore --thp): aligned 2 MiB that went in whole as one huge page. */
  hugePages: number;
  bytesReceived: number;
  faultLatencyUs: { count: number; p50: number; p90: number; p99: number; max: number; mean: number };
  blockedMs: number;
  fullResidencyMs: number;
  window: TransferOptions['window'];
  background: TransferOptions['background'];
  /** From a live source: its precopy rounds here, and when its switchover came (ms from the start). */
  precopy?: { pagesPrecopied: number; pagesRewritten: number; pagesDiscarded: number; switchoverMs: number };
  [key: string]: unknown;
}

const us = (ns: number) => Math.round(ns / 10) / 100;
const ms = (ns: number) => Math.round(ns / 1e4) / 100;

/**
 * The report of an engine's figures. `regions`: the memory it filled (FaultEngine.regions); `pages`
 * counts each region's own pages (a 2 MiB huge page is one), `bytes` their sizes.
 */
export function summarize(s: DestinationStats, transfer: TransferOptions, regions: readonly { length: number; pageSize: number }[]): RestoreReport {
  return {
    pages: s.totalPages,
    bytes: regions.reduce((n, r) => n + r.length, 0),
    faults: s.faults,
    minorFaults: s.minorFaults,
    pagesOnDemand: s.pagesInstalledRequested,
    pagesWindow: s.pagesInstalledWindow,
    pagesBackground: s.pagesInstalledBackground,
    pagesPrefetched: s.pagesInstalledPrefetch,
    zeroPages: s.zeroPages,
    duplicatePages: s.duplicatePages,
    hugePages: s.hugeInstalls,
    bytesReceived: s.bytesReceived,
    faultLatencyUs: {
      count: s.faultLatency.count,
      p50: us(s.faultLatency.p50Ns),
      p90: us(s.faultLatency.p90Ns),
      p99: us(s.faultLatency.p99Ns),
      max: us(s.faultLatency.maxNs),
      mean: us(s.faultLatency.meanNs),
    },
    blockedMs: ms(s.blockedNs),
    fullResidencyMs: ms(s.fullResidencyNs),
    window: transfer.window,
    background: transfer.background,
    ...(s.switchoverNs > 0
      ? { precopy: { pagesPrecopied: s.pagesPrecopied, pagesRewritten: s.pagesRewritten, pagesDiscarded: s.pagesDiscarded, switchoverMs: ms(s.switchoverNs) } }
      : {}),
  };
}
