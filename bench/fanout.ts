// postcopy bench fanout: one source feeding many destinations at once. One
// `postcopy serve` process (a unix socket, then TCP loopback) serves the
// floor's image to 16 `postcopy restore` processes at the same time (each its own session, its
// workload touching every page once in its own seeded random order, the
// background on), and, interleaved with that, to one restore alone. Reported:
// the bytes a second all of them took together against the floor's bulk
// case on the same transport, each destination's fault p99 against the lone
// destination's, and the source's CPU per GiB it served.
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import type { RestoreReport } from '../client/report.js';
import { floorImageFile, processCpuNs, runCliJson, startSource, type RunningSource } from './source.js';
import { runFloor, type FloorBulk } from './floor.js';
import { median, round } from './latency.js';
import { removeScratchDir, scratchDir } from './cleanup.js';
import { join } from 'node:path';

export const FANOUT_TRANSPORTS = ['unix', 'tcp'] as const;
export type FanoutTransport = (typeof FANOUT_TRANSPORTS)[number];

interface Restore {
  faultP99Us: number;
  bytes: number;
}

interface Wave {
  destinations: number;
  wallMs: number;
  bytes: number;
  sourceCpuMs: number;
  faultP99Us: number[];
}

export interface FanoutResult {
  case: 'fanout';
  transport: FanoutTransport;
  pages: number;
  destinations: number;
  rounds: number;
  /** All destinations' bytes over the wave's wall time, GB/s; the floor's bulk case on the same transport; their ratio. */
  aggregateGBps: number;
  floorBulkGBps: number;
  aggregateVsFloorBulk: number;
  /** The median destination's fault p99 in the wave, the slowest one's, and the lone destination's (µs); median over lone. */
  faultP99Us: { median: number; worst: number; alone: number };
  /** Null when the lone destination had no fault to measure (a small image the background filled first). */
  faultP99VsAlone: number | null;
  /** The source's CPU per GiB served, in the wave and alone (ms). */
  sourceCpuMsPerGiB: { wave: number; alone: number };
  /** Each wave's wall time, the wave over one alone (16 times the bytes). */
  wallMs: { wave: number; alone: number };
}

/** One `postcopy restore` process: every page touched once in a random order (its seed), the background on; its JSON report. */
async function restoreOnce(source: RunningSource, tokenFile: string | undefined, seed: number): Promise<Restore> {
  const report = await runCliJson<RestoreReport>([
    'restore',
    '--source',
    source.address,
    ...(tokenFile ? ['--token-file', tokenFile] : []),
    '--workload',
    'random',
    '--seed',
    String(seed),
    '--json',
  ]);
  return { faultP99Us: report.faultLatencyUs.p99, bytes: report.bytesReceived };
}

async function wave(source: RunningSource, tokenFile: string | undefined, destinations: number, round0: number): Promise<Wave> {
  const cpu0 = processCpuNs(source.pid);
  const t0 = performance.now();
  const restores = await Promise.all(Array.from({ length: destinations }, (_, k) => restoreOnce(source, tokenFile, round0 * 1000 + k + 1)));
  return {
    destinations,
    wallMs: performance.now() - t0,
    bytes: restores.reduce((n, r) => n + r.bytes, 0),
    sourceCpuMs: (processCpuNs(source.pid) - cpu0) / 1e6,
    faultP99Us: restores.map((r) => r.faultP99Us),
  };
}

export async function fanoutBench(
  pages: number,
  destinations: number,
  rounds: number,
  transports: readonly FanoutTransport[],
  progress: (line: string) => void = () => {},
): Promise<FanoutResult[]> {
  const dir = scratchDir('postcopy-bench-fanout-');
  const out: FanoutResult[] = [];
  try {
    const image = floorImageFile(dir, pages);
    for (const transport of transports) {
      const floorRuns: number[] = [];
      const waves: Wave[] = [];
      const alone: Wave[] = [];
      const tokenFile = transport === 'tcp' ? join(dir, 'token') : undefined;
      if (tokenFile) writeFileSync(tokenFile, randomBytes(24).toString('base64url'), { mode: 0o600 });
      const source = await startSource(image, transport === 'unix' ? `unix:${join(dir, 'source.sock')}` : 'tcp:127.0.0.1:0', tokenFile ? { tokenFile } : {});
      try {
        for (let r = 0; r < rounds; r++) {
          const bulk = (await runFloor(pages, 1, [`bulk-${transport}`])).get(`bulk-${transport}`) as FloorBulk;
          floorRuns.push(bulk.gbytes_per_s);
          // Alternate which goes first, so neither always runs on a warmer machine.
          for (const many of r % 2 ? [false, true] : [true, false]) {
            const w = await wave(source, tokenFile, many ? destinations : 1, r);
            (many ? waves : alone).push(w);
            progress(`fanout: ${transport} round ${r + 1}: ${w.destinations} at once in ${round(w.wallMs)} ms, fault p99 ${median(w.faultP99Us)} µs`);
          }
        }
      } finally {
        await source.close();
      }
      const gib = (w: Wave) => w.bytes / 2 ** 30;
      const aggregateGBps = median(waves.map((w) => w.bytes / (w.wallMs / 1e3) / 1e9));
      const floorBulkGBps = median(floorRuns);
      const p99 = median(waves.map((w) => median(w.faultP99Us)));
      const alone99 = median(alone.map((w) => w.faultP99Us[0]));
      out.push({
        case: 'fanout',
        transport,
        pages,
        destinations,
        rounds,
        aggregateGBps: round(aggregateGBps, 3),
        floorBulkGBps: round(floorBulkGBps, 3),
        aggregateVsFloorBulk: round(aggregateGBps / floorBulkGBps, 2),
        faultP99Us: { median: p99, worst: median(waves.map((w) => Math.max(...w.faultP99Us))), alone: alone99 },
        faultP99VsAlone: alone99 > 0 ? round(p99 / alone99, 2) : null,
        sourceCpuMsPerGiB: { wave: round(median(waves.map((w) => w.sourceCpuMs / gib(w)))), alone: round(median(alone.map((w) => w.sourceCpuMs / gib(w)))) },
        wallMs: { wave: round(median(waves.map((w) => w.wallMs))), alone: round(median(alone.map((w) => w.wallMs))) },
      });
    }
  } finally {
    removeScratchDir(dir);
  }
  return out;
}

/** The results as a table for people. */
export function fanoutTable(results: FanoutResult[]): string {
  const lines = [
    '| transport | destinations | together GB/s | floor bulk GB/s | ratio | fault p99 µs: median / worst / alone | median / alone | source CPU ms per GiB: wave / alone | wall ms: wave / alone |',
    '|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of results)
    lines.push(
      `| ${r.transport} | ${r.destinations} | ${r.aggregateGBps} | ${r.floorBulkGBps} | ${r.aggregateVsFloorBulk}x | ${r.faultP99Us.median} / ${r.faultP99Us.worst} / ${r.faultP99Us.alone} | ${r.faultP99VsAlone === null ? 'no lone fault' : `${r.faultP99VsAlone}x`} | ${r.sourceCpuMsPerGiB.wave} / ${r.sourceCpuMsPerGiB.alone} | ${r.wallMs.wave} / ${r.wallMs.alone} |`,
    );
  return lines.join('\n') + '\n';
}
