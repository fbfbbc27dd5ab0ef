// postcopy bench live: moving a running workload (the VMM fixture in source
// mode, writing a share of its pages every second, uniformly) to a `restore`
// whose own workload touches every page in a random order once it runs. The
// three ways, side by side for each write rate, in one run:
//   postcopy          the workload pauses at once; everything comes after
//   precopy+postcopy  rounds while it runs, then the switchover, then postcopy
//   precopy           rounds, then what is left during the pause (no postcopy)
// The source runs in this process; the destination is the CLI.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { buildFixture } from '../lib/c-programs.js';
import { LiveMigration, LiveWorkload, type LiveOptions, type LiveReport } from '../server/live.js';
import { PageServer } from '../server/page-server.js';
import { round } from './latency.js';
import { writePatternImage } from './localhost.js';
import { runCliJson } from './source.js';
import { removeScratchDir, scratchDir, stopAtExit } from './cleanup.js';

export type LiveMode = NonNullable<LiveOptions['mode']>;

export interface LiveResult {
  mode: LiveMode;
  /** The share of its pages the workload writes each second. */
  writeRate: number;
  pages: number;
  /** From the workload pausing at the source to the destination saying it runs. */
  pauseMs: number;
  /** From the destination connecting to its report (every page in, digest compared). */
  totalMs: number;
  bytesSent: number;
  /** Faults the destination's workload took in its first second of running (all of them, when it finished sooner). */
  faultsFirstSecond: number;
  digestMatch: boolean;
  rounds: number;
  pagesDiscarded: number;
  switchoverBy: LiveReport['switchoverBy'];
}

export const LIVE_MODES: LiveMode[] = ['postcopy', 'precopy+postcopy', 'precopy'];

async function one(
  mode: LiveMode,
  writeRate: number,
  pages: number,
  imagePath: string,
  dir: string,
  seed: number,
  rate: string | undefined,
): Promise<LiveResult> {
  const workloadSocket = join(dir, `workload-${seed}.sock`);
  const accepting = LiveWorkload.accept(workloadSocket);
  const fixture = stopAtExit(
    spawn(
      buildFixture('vmm'),
      ['--live-source', workloadSocket, '--image', imagePath, '--write-rate', String(Math.round(writeRate * pages)), '--threads', '1', '--seed', String(seed)],
      { stdio: ['ignore', 'ignore', 'inherit'] },
    ),
  );
  const fixtureDone = once(fixture, 'close');
  let server: PageServer | null = null;
  let live: LiveMigration | null = null;
  try {
    live = new LiveMigration(await accepting, { mode });
    server = new PageServer({ image: live.workload.image, live });
    const source = await server.listen(`unix:${join(dir, `source-${seed}.sock`)}`);
    const reported = new Promise<LiveReport>((resolve, reject) => {
      live!.once('report', resolve);
      live!.once('aborted', reject);
    });
    const started = performance.now();
    const report = await runCliJson<{ digestMatch: boolean; faultsFirstSecond?: number; faults: number }>([
      'restore',
      '--source',
      `unix:${(source as { path: string }).path}`,
      '--json',
      '--workload',
      'random',
      '--seed',
      String(seed),
      ...(rate ? ['--rate', rate] : []),
    ]);
    const totalMs = performance.now() - started;
    const liveReport = await reported;
    return {
      mode,
      writeRate,
      pages,
      pauseMs: liveReport.pauseMs,
      totalMs: round(totalMs, 1),
      bytesSent: server.figures().bytesSent,
      faultsFirstSecond: report.faultsFirstSecond ?? report.faults,
      digestMatch: report.digestMatch === true,
      rounds: liveReport.rounds,
      pagesDiscarded: liveReport.pagesDiscarded,
      switchoverBy: liveReport.switchoverBy,
    };
  } finally {
    await server?.close();
    live?.workload.close();
    if (fixture.exitCode === null) fixture.kill('SIGKILL');
    await fixtureDone;
  }
}

/**
 * Every mode for every write rate (shares of the pages per second), the modes
 * of a rate back to back. `rate`: the link's rate (the destination's --rate,
 * e.g. 125M for 1 Gb/s; default: the unix socket's own).
 */
export async function liveBench(pages: number, writeRates: number[], progress: (line: string) => void, rate?: string): Promise<LiveResult[]> {
  const dir = scratchDir('uffd-postcopy-live-');
  const results: LiveResult[] = [];
  try {
    const imagePath = join(dir, 'image.bin');
    writePatternImage(imagePath, pages * 4096);
    let seed = 1;
    for (const writeRate of writeRates) {
      for (const mode of LIVE_MODES) {
        progress(`live: ${mode}, the workload writing ${writeRate * 100}% of its ${pages} pages a second${rate ? `, a ${rate}/s link` : ''}`);
        results.push(await one(mode, writeRate, pages, imagePath, dir, seed++, rate));
      }
    }
  } finally {
    removeScratchDir(dir);
  }
  return results;
}

export function liveTable(results: LiveResult[]): string {
  return [
    '| writes/s | mode | rounds | pause | total | sent | faults, first second | discarded | switchover by | digest match |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...results.map(
      (r) =>
        `| ${r.writeRate * 100}% | ${r.mode} | ${r.rounds} | ${r.pauseMs} ms | ${r.totalMs} ms | ${(r.bytesSent / 2 ** 20).toFixed(1)} MiB | ${r.faultsFirstSecond} | ${r.pagesDiscarded} | ${r.switchoverBy} | ${r.digestMatch} |`,
    ),
    '',
  ].join('\n');
}
