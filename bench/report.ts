// The benchmark report: JSON for machines, Markdown for people.
import type { ScenarioResult } from './scenario.js';
import type { FloorBulk, FloorLatency } from './floor.js';

export interface ScalingRow {
  mib: number;
  pages: number;
  fullResidencyMs: number;
  floorBulkMs: number | null;
  randomWorkloadMs: number;
  randomP50Us: number;
}

export interface SuiteReport {
  when: string;
  machine: { cpus: number; kernel: string; node: string };
  mode: 'quick' | 'full';
  pages: number;
  /** The floor's median run per case (the suite runs it at least three times, spread over the run). */
  floor: Record<string, FloorLatency | FloorBulk>;
  /** How many floor runs, and the smallest and largest p50 (or GB/s) among them. */
  floorSpread: Record<string, { runs: number } & Record<string, number | [number, number]>>;
  floorCommand: string | null;
  links: { name: string; description?: string; skipped?: string }[];
  results: ScenarioResult[];
  scaling: ScalingRow[];
  plots: string[];
  /** How many times each scenario ran, interleaved (policies alternate within a round). */
  rounds: number;
  headline: HeadlineRow[];
}

const f = (x: number | null | undefined, d = 1) => (x === null || x === undefined ? '–' : x.toFixed(d));

/** The floor's latency case for a link: its unix case for the unix socket, its TCP loopback case otherwise. */
export function floorFor(report: SuiteReport, link: string): FloorLatency | undefined {
  return report.floor[link === 'unix' ? 'unix' : 'tcp'] as FloorLatency | undefined;
}

/** For each workload (link, pattern, threads, placement free), the policies ranked by workload time. */
export function rankPolicies(results: ScenarioResult[]) {
  const groups = new Map<string, ScenarioResult[]>();
  for (const r of results) {
    if (r.placement !== 'free' || r.pattern === 'none') continue;
    const key = `${r.link}|${r.pattern}|${r.threads}`;
    groups.set(key, [...(groups.get(key) ?? []), r]);
  }
  return [...groups.values()].map((rows) => {
    const ranked = [...rows].sort((a, b) => a.workloadMs - b.workloadMs);
    const def = ranked.find((r) => r.policy === 'default');
    return {
      link: rows[0].link,
      pattern: rows[0].pattern,
      threads: rows[0].threads,
      best: ranked[0],
      def,
      rank: def ? ranked.indexOf(def) + 1 : 0,
      of: ranked.length,
    };
  });
}

/**
 * The suite's headline, one row per link, pattern and threads: the default
 * policy's workload time over the best fixed policy's (the one with the
 * lowest median), and the default's fault p50 (the background on) over pure
 * on-demand's; medians over the rounds, with the per-round spread.
 */
export interface HeadlineRow {
  link: string;
  pattern: string;
  threads: number;
  rounds: number;
  defaultMs: number;
  best: string;
  bestMs: number;
  defaultVsBest: number;
  defaultVsBestSpread: [number, number];
  faultP50Us: number;
  onDemandFaultP50Us: number;
  faultP50VsOnDemand: number;
  faultP50VsOnDemandSpread: [number, number];
}

const middle = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const r2 = (x: number) => Math.round(x * 100) / 100;

export function headline(results: ScenarioResult[]): HeadlineRow[] {
  const groups = new Map<string, Map<string, ScenarioResult[]>>();
  for (const r of results) {
    if (r.placement !== 'free' || r.pattern === 'none') continue;
    const key = `${r.link}|${r.pattern}|${r.threads}`;
    const byPolicy = groups.get(key) ?? new Map<string, ScenarioResult[]>();
    byPolicy.set(r.policy, [...(byPolicy.get(r.policy) ?? []), r]);
    groups.set(key, byPolicy);
  }
  const rows: HeadlineRow[] = [];
  for (const byPolicy of groups.values()) {
    const def = byPolicy.get('default');
    const onDemand = byPolicy.get('on-demand');
    const fixed = [...byPolicy.entries()].filter(([name]) => name !== 'default');
    if (!def || !onDemand || fixed.length === 0) continue;
    const [best, bestRuns] = fixed.sort((a, b) => middle(a[1].map((r) => r.workloadMs)) - middle(b[1].map((r) => r.workloadMs)))[0];
    const rounds = Math.min(def.length, bestRuns.length, onDemand.length);
    const perRound = (f: (k: number) => number) => Array.from({ length: rounds }, (_, k) => f(k));
    const vsBest = perRound((k) => def[k].workloadMs / bestRuns[k].workloadMs);
    const vsOnDemand = perRound((k) => def[k].faultUs.p50 / onDemand[k].faultUs.p50);
    const defaultMs = middle(def.map((r) => r.workloadMs));
    const bestMs = middle(bestRuns.map((r) => r.workloadMs));
    const faultP50Us = middle(def.map((r) => r.faultUs.p50));
    const onDemandFaultP50Us = middle(onDemand.map((r) => r.faultUs.p50));
    rows.push({
      link: def[0].link,
      pattern: def[0].pattern,
      threads: def[0].threads,
      rounds,
      defaultMs,
      best,
      bestMs,
      defaultVsBest: r2(middle(vsBest)),
      defaultVsBestSpread: [r2(Math.min(...vsBest)), r2(Math.max(...vsBest))],
      faultP50Us,
      onDemandFaultP50Us,
      faultP50VsOnDemand: r2(middle(vsOnDemand)),
      faultP50VsOnDemandSpread: [r2(Math.min(...vsOnDemand)), r2(Math.max(...vsOnDemand))],
    });
  }
  return rows;
}

/** The headline as a table for people. */
export function headlineTable(rows: HeadlineRow[]): string {
  const lines = [
    'link          pattern/thr     default ms   best fixed policy     default/best   fault p50 µs (default / on-demand)   ratio',
    ...rows.map(
      (r) =>
        `${r.link.padEnd(13)} ${`${r.pattern}/${r.threads}`.padEnd(15)} ${r.defaultMs.toFixed(1).padStart(10)}   ${`${r.best} ${r.bestMs.toFixed(1)} ms`.padEnd(21)} ${`${r.defaultVsBest.toFixed(2)}x`.padStart(12)}   ${`${r.faultP50Us.toFixed(1)} / ${r.onDemandFaultP50Us.toFixed(1)}`.padStart(34)}   ${`${r.faultP50VsOnDemand.toFixed(2)}x`.padStart(5)}`,
    ),
  ];
  if (rows.some((r) => r.rounds > 1)) lines.push(`(medians of ${rows[0].rounds} interleaved rounds; the spreads are in --json and results.json)`);
  return lines.join('\n') + '\n';
}

function spreadOf(report: SuiteReport, k: string): string {
  const r = report.floorSpread?.[k]?.p50_us;
  return Array.isArray(r) ? `${f(r[0])} to ${f(r[1])}` : '–';
}

export function markdown(report: SuiteReport): string {
  const L: string[] = [];
  L.push(`# uffd-postcopy benchmark (${report.mode})`, '');
  L.push(`${report.when} · ${report.machine.cpus} CPUs · Linux ${report.machine.kernel} · Node ${report.machine.node}`, '');
  L.push(
    `Image: ${report.pages} pages (${((report.pages * 4096) / 2 ** 20).toFixed(0)} MiB), the floor's image (page i filled with i*7+1). Each row is one destination session against a source in its own process.`,
    '',
  );
  if (report.floorCommand) {
    const fl = (k: string) => report.floor[k] as FloorLatency | undefined;
    const fb = (k: string) => report.floor[k] as FloorBulk | undefined;
    L.push(
      `Floor (\`${report.floorCommand}\`, same run, same pages and seed; the median of ${report.floorSpread?.unix?.runs ?? 1} runs spread over the run, unix p50 from ${spreadOf(report, 'unix')} µs): unix p50 ${f(fl('unix')?.p50_us)} µs, p99 ${f(fl('unix')?.p99_us)} µs, all pages ${f(fl('unix')?.total_ms)} ms; tcp p50 ${f(fl('tcp')?.p50_us)} µs, p99 ${f(fl('tcp')?.p99_us)} µs, all pages ${f(fl('tcp')?.total_ms)} ms; bulk unix ${f(fb('bulk-unix')?.total_ms)} ms (${f(fb('bulk-unix')?.gbytes_per_s, 2)} GB/s), bulk tcp ${f(fb('bulk-tcp')?.total_ms)} ms (${f(fb('bulk-tcp')?.gbytes_per_s, 2)} GB/s).`,
      '',
    );
  } else {
    L.push('Floor: not found (set UFFD_FLOOR); no ratios.', '');
  }
  L.push('Links:', '');
  for (const l of report.links) L.push(`- **${l.name}**: ${l.skipped ? `skipped: ${l.skipped}` : l.description}`);
  L.push('');
  L.push('## Results', '');
  L.push(
    "First touch: each page's first touch as the workload saw it (a page brought by the window or the background stream costs almost nothing). × floor: ours / the floor's on the same kind of link (its workload is random, one thread, pure on-demand). Workload: first to last touch. CPU: the source process, and the destination's engine threads. CPUs: where the workload thread(s) ran → where the engine's fault thread ran.",
    '',
  );
  L.push(
    '| link | pattern | thr | policy | first touch p50 / p99 µs | × floor p50 | faults | fault p50 / p99 µs | blocked ms | workload ms | × floor | full residency ms | MiB down | src / dst CPU ms | CPUs |',
  );
  L.push('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of report.results) {
    if (r.placement !== 'free') continue;
    const fl = floorFor(report, r.link);
    const ratio = fl && r.firstTouchUs.p50 ? (r.firstTouchUs.p50 / fl.p50_us).toFixed(2) : '–';
    const wratio = fl && r.pattern !== 'none' ? (r.workloadMs / fl.total_ms).toFixed(2) : '–';
    L.push(
      `| ${r.link} | ${r.pattern} | ${r.threads} | ${r.policy} | ${f(r.firstTouchUs.p50)} / ${f(r.firstTouchUs.p99)} | ${ratio} | ${r.faults} | ${f(r.faultUs.p50)} / ${f(r.faultUs.p99)} | ${f(r.blockedMs)} | ${f(r.workloadMs)} | ${wratio} | ${f(r.fullResidencyMs)} | ${f(r.bytesDown / 2 ** 20)} | ${f(r.cpu.sourceMs)} / ${f(r.cpu.destinationMs)} | ${r.cpus.workload.join(',')}→${r.cpus.destination['pc-fault'] ?? '?'} |`,
    );
  }
  L.push('');
  if (report.headline?.length) {
    L.push('## Headline', '');
    L.push(
      `The default policy's workload time over the best fixed policy's, and its fault p50 (the background on) over pure on-demand's${report.rounds > 1 ? `; medians of ${report.rounds} interleaved rounds, per-round spread in brackets` : ''}.`,
      '',
    );
    L.push('| link | pattern | thr | default ms | best fixed policy | default / best | fault p50 µs default / on-demand | ratio |');
    L.push('|---|---|---|---|---|---|---|---|');
    for (const h of report.headline)
      L.push(
        `| ${h.link} | ${h.pattern} | ${h.threads} | ${f(h.defaultMs)} | ${h.best} ${f(h.bestMs)} ms | ${h.defaultVsBest.toFixed(2)}x${h.rounds > 1 ? ` [${h.defaultVsBestSpread.join(', ')}]` : ''} | ${f(h.faultP50Us)} / ${f(h.onDemandFaultP50Us)} | ${h.faultP50VsOnDemand.toFixed(2)}x${h.rounds > 1 ? ` [${h.faultP50VsOnDemandSpread.join(', ')}]` : ''} |`,
      );
    L.push('');
  }
  const ranks = rankPolicies(report.results);
  if (ranks.length) {
    const bestCount = ranks.filter((r) => r.rank === 1).length;
    const near = ranks.filter((r) => r.def && r.def.workloadMs <= r.best.workloadMs * 1.1).length;
    L.push('## Which policy wins (by workload time)', '');
    L.push(`The default (window 8:2, background on) is the fastest on ${bestCount} of ${ranks.length} workloads and within 10% of the fastest on ${near}.`, '');
    L.push("| link | pattern | thr | fastest policy | its workload ms | default's rank | default workload ms |");
    L.push('|---|---|---|---|---|---|---|');
    for (const r of ranks)
      L.push(`| ${r.link} | ${r.pattern} | ${r.threads} | ${r.best.policy} | ${f(r.best.workloadMs)} | ${r.rank} of ${r.of} | ${f(r.def?.workloadMs)} |`);
    L.push('');
  }
  const placed = report.results.filter(
    (r) => r.placement !== 'free' || (r.link === 'unix' && r.pattern === 'random' && r.threads === 1 && r.policy === 'on-demand'),
  );
  if (placed.some((r) => r.placement !== 'free')) {
    L.push('## Same CPU or across CPUs', '');
    L.push(
      'Random pattern, one thread, pure on-demand, unix socket. one-cpu: the workload, the destination engine and the source all pinned to CPU 0; split: the workload on CPU 0, the engine and the source on CPU 1; free: the scheduler decides.',
      '',
    );
    L.push('| placement | first touch p50 / p99 µs | fault p50 µs | workload ms | CPUs |');
    L.push('|---|---|---|---|---|');
    for (const r of placed)
      L.push(
        `| ${r.placement} | ${f(r.firstTouchUs.p50)} / ${f(r.firstTouchUs.p99)} | ${f(r.faultUs.p50)} | ${f(r.workloadMs)} | ${r.cpus.workload.join(',')}→${r.cpus.destination['pc-fault'] ?? '?'} (source ${Object.values(r.cpus.source).join(',') || '?'}) |`,
      );
    L.push('');
  }
  if (report.scaling.length) {
    L.push('## Image size', '');
    L.push(
      'Background stream alone over a unix socket, and the default policy under a random one-thread workload, per image size. Linear growth keeps ms per GiB flat.',
      '',
    );
    L.push('| size | full residency ms | ms per GiB | floor bulk ms | × floor | random workload ms (default policy) | first-touch p50 µs |');
    L.push('|---|---|---|---|---|---|---|');
    for (const s of report.scaling) {
      L.push(
        `| ${s.mib} MiB | ${f(s.fullResidencyMs)} | ${f(s.fullResidencyMs / (s.mib / 1024))} | ${f(s.floorBulkMs)} | ${s.floorBulkMs ? (s.fullResidencyMs / s.floorBulkMs).toFixed(2) : '–'} | ${f(s.randomWorkloadMs)} | ${f(s.randomP50Us)} |`,
      );
    }
    L.push('');
  }
  if (report.plots.length) {
    L.push('## Plots', '');
    for (const p of report.plots) L.push(`- ${p}`);
    L.push('');
  }
  return L.join('\n');
}
