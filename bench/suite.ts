// The benchmark suite: links x access patterns x policies (x image sizes in the
// full set), each beside the floor measured in the same run; writes JSON, a
// Markdown table and SVG plots into a reports folder.
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, release, tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { floorCommand, runFloor, type FloorBulk, type FloorLatency } from './floor.js';
import { LINKS, bringUp } from './links.js';
import { FREE, POLICIES, runScenario, type Placement, type Policy } from './scenario.js';
import { floorImageFile, startSource, type RunningSource } from './source.js';
import { execFileSync } from 'node:child_process';
import type { Pattern } from './patterns.js';
import { PLOTS_NEED, latencyCdf, plotting, residencyOverTime, scaling } from './plots.js';
import { headline, markdown, type ScalingRow, type SuiteReport } from './report.js';
import { removeScratchDir, scratchDir } from './cleanup.js';

export interface SuiteOptions {
  full: boolean;
  /** Where reports go (default ./reports/<timestamp>, under the directory the command runs in: never inside the installed package). */
  outDir?: string;
  /** Main-matrix image size in pages (default 16384: 64 MiB). */
  pages?: number;
  /** Only these links. */
  links?: string[];
  /** Each scenario this many times, interleaved (default 1): the headline's ratios are medians of the rounds. */
  rounds?: number;
  progress: (line: string) => void;
}

const QUICK = {
  links: ['unix', 'tcp'],
  workloads: [
    ['random', 1],
    ['sequential', 1],
    ['hotset', 1],
    ['random', 2],
  ] as [Pattern, number][],
  policies: ['on-demand', 'window-16', 'background', 'default'],
};
const FULL = {
  links: LINKS.map((l) => l.name),
  workloads: (['random', 'sequential', 'hotset', 'strided'] as Pattern[]).flatMap(
    (p) =>
      [
        [p, 1],
        [p, 2],
      ] as [Pattern, number][],
  ),
  policies: POLICIES.map((p) => p.name),
};
const SIZES_MIB = [64, 256, 1024, 2048];

export async function runSuite(options: SuiteOptions): Promise<{ dir: string; report: SuiteReport }> {
  const plan = options.full ? FULL : QUICK;
  const pages = options.pages ?? 16384;
  const stamp = new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19);
  const dir = options.outDir ?? join(process.cwd(), 'reports', stamp);
  mkdirSync(dir, { recursive: true });
  // Images live in memory (tmpfs) when it exists, so disks play no part.
  const scratch = scratchDir('postcopy-bench-', existsSync('/dev/shm') ? '/dev/shm' : tmpdir());
  const say = options.progress;
  const report: SuiteReport = {
    when: new Date().toISOString(),
    machine: { cpus: availableParallelism(), kernel: release(), node: process.version },
    mode: options.full ? 'full' : 'quick',
    pages,
    floor: {},
    floorSpread: {},
    floorCommand: floorCommand(),
    links: [],
    results: [],
    scaling: [],
    plots: [],
    rounds: options.rounds ?? 1,
    headline: [],
  };
  try {
    say(`floor: ${report.floorCommand}`);
    // The floor runs at the start, after each link and at the end (three times
    // at least): its figures are the medians, so a ratio never rests on one run.
    const floorRuns: Map<string, FloorLatency | FloorBulk>[] = [];
    const floorOnce = async () => floorRuns.push(await runFloor(pages, 1, ['unix', 'tcp', 'bulk-unix', 'bulk-tcp']));
    await floorOnce();
    const imagePath = floorImageFile(scratch, pages);
    const policies = plan.policies.map((name) => POLICIES.find((p) => p.name === name)!);
    for (const spec of LINKS.filter((l) => (options.links ? options.links.includes(l.name) : plan.links.includes(l.name)))) {
      const link = await bringUp(spec, imagePath, scratch);
      if ('skipped' in link) {
        say(`${spec.name}: skipped (${link.skipped})`);
        report.links.push({ name: spec.name, skipped: link.skipped });
        continue;
      }
      report.links.push({ name: link.up.name, description: link.up.description });
      say(`${link.up.name}: ${link.up.description}`);
      try {
        for (let round = 0; round < report.rounds; round++) {
          // Interleaved: every policy once per round, in the other order the next round.
          const order = round % 2 === 0 ? policies : [...policies].reverse();
          for (const [pattern, threads] of plan.workloads) {
            for (const policy of order) {
              const r = await runScenario({
                link: link.up.name,
                source: link.up.source,
                token: link.up.token,
                pages,
                pattern,
                threads,
                policy,
                placement: FREE,
              });
              report.results.push(r);
              say(
                `  ${report.rounds > 1 ? `round ${round + 1} ` : ''}${pattern}/${threads} ${policy.name}: first touch p50 ${r.firstTouchUs.p50} µs, fault p50 ${r.faultUs.p50} µs, workload ${r.workloadMs} ms, full residency ${r.fullResidencyMs ?? '–'} ms`,
              );
            }
          }
        }
        if (spec.name === 'unix' && availableParallelism() >= 2) await placements(report, link.up.source, pages, say);
      } finally {
        await link.up.down();
      }
      await floorOnce();
    }
    while (floorRuns.length < 3) await floorOnce();
    for (const k of floorRuns[0].keys()) {
      const runs = floorRuns.map((m) => m.get(k)!);
      const key = 'p50_us' in runs[0] ? 'p50_us' : 'gbytes_per_s';
      const sorted = [...runs].sort((a, b) => (a as unknown as Record<string, number>)[key] - (b as unknown as Record<string, number>)[key]);
      report.floor[k] = sorted[Math.floor(sorted.length / 2)];
      report.floorSpread[k] = {
        runs: runs.length,
        [key]: [(sorted[0] as unknown as Record<string, number>)[key], (sorted[sorted.length - 1] as unknown as Record<string, number>)[key]],
      };
    }
    if (options.full && (!options.links || options.links.includes('unix'))) await sizes(report, scratch, say);
    if (await plotting()) await plots(report, dir);
    else say(PLOTS_NEED);
  } finally {
    removeScratchDir(scratch);
  }
  report.headline = headline(report.results);
  writeFileSync(join(dir, 'results.json'), JSON.stringify(report, null, 1));
  writeFileSync(join(dir, 'report.md'), markdown(report));
  return { dir, report };
}

/**
 * The same run with threads placed by hand: everything on CPU 0 ("one-cpu"),
 * or the workload on CPU 0 and the destination engine and the source on CPU 1
 * ("split"). The source process is re-pinned with taskset; its session threads
 * inherit that.
 */
async function placements(report: SuiteReport, source: RunningSource, pages: number, say: (l: string) => void): Promise<void> {
  const onDemand = POLICIES.find((p) => p.name === 'on-demand')!;
  const pin = (cpus: string) => execFileSync('taskset', ['-a', '-p', '-c', cpus, String(source.pid)], { stdio: 'ignore' });
  const all = `0-${availableParallelism() - 1}`;
  try {
    for (const [placement, sourceCpu] of [
      [{ name: 'one-cpu', touchCpu: 0, engineCpu: 0 }, '0'],
      [{ name: 'split', touchCpu: 0, engineCpu: 1 }, '1'],
    ] as [Placement, string][]) {
      pin(sourceCpu);
      const r = await runScenario({ link: 'unix', source, pages, pattern: 'random', threads: 1, policy: onDemand, placement });
      report.results.push(r);
      say(`  placement ${placement.name}: first touch p50 ${r.firstTouchUs.p50} µs`);
    }
  } catch (err) {
    say(`  placement runs skipped: ${(err as Error).message}`);
  } finally {
    try {
      pin(all);
    } catch {
      /* the source is gone */
    }
  }
}

async function sizes(report: SuiteReport, scratch: string, say: (l: string) => void): Promise<void> {
  const background: Policy = POLICIES.find((p) => p.name === 'background')!;
  const def: Policy = POLICIES.find((p) => p.name === 'default')!;
  for (const mib of SIZES_MIB) {
    const pages = (mib * 2 ** 20) / 4096; // (mib << 20 overflows 32 bits at 2 GiB)
    const imagePath = floorImageFile(scratch, pages);
    const source = await startSource(imagePath, `unix:${join(scratch, `size-${mib}.sock`)}`);
    try {
      const bg = await runScenario({ link: 'unix', source, pages, pattern: 'none', threads: 1, policy: background, placement: FREE });
      const random = await runScenario({ link: 'unix', source, pages, pattern: 'random', threads: 1, policy: def, placement: FREE });
      const floor = (await runFloor(pages, 1, ['bulk-unix'])).get('bulk-unix') as FloorBulk | undefined;
      const row: ScalingRow = {
        mib,
        pages,
        fullResidencyMs: bg.fullResidencyMs!,
        floorBulkMs: floor?.total_ms ?? null,
        randomWorkloadMs: random.workloadMs,
        randomP50Us: random.firstTouchUs.p50,
      };
      report.scaling.push(row);
      say(`size ${mib} MiB: full residency ${row.fullResidencyMs} ms (floor bulk ${row.floorBulkMs ?? '–'} ms), random workload ${row.randomWorkloadMs} ms`);
    } finally {
      await source.close();
      rmSync(imagePath, { force: true });
    }
  }
}

async function plots(report: SuiteReport, dir: string): Promise<void> {
  const linksRun = [...new Set(report.results.map((r) => r.link))];
  for (const link of linksRun) {
    const rows = report.results.filter((r) => r.link === link && r.pattern === 'random' && r.threads === 1 && r.placement === 'free');
    if (!rows.length) continue;
    report.plots.push(relative(dir, await latencyCdf(rows, `First-touch latency, random pattern, one thread, ${link}`, join(dir, `latency-cdf-${link}.svg`))));
    report.plots.push(
      relative(dir, await residencyOverTime(rows, `Pages resident over time, random pattern, one thread, ${link}`, join(dir, `residency-${link}.svg`))),
    );
  }
  if (report.scaling.length) {
    const points = report.scaling.flatMap((s) => [
      { mib: s.mib, series: 'ours: background stream', ms: s.fullResidencyMs },
      ...(s.floorBulkMs ? [{ mib: s.mib, series: 'floor: bulk unix', ms: s.floorBulkMs }] : []),
      { mib: s.mib, series: 'ours: default policy, random workload', ms: s.randomWorkloadMs },
    ]);
    report.plots.push(relative(dir, await scaling(points, join(dir, 'scaling.svg'))));
  }
}
