// Plots rendered to SVG with vega-lite (no browser, no canvas): first-touch
// latency CDF per policy, pages resident over time per policy, and scaling.
import { writeFileSync } from 'node:fs';
import * as vega from 'vega';
import { compile, type TopLevelSpec } from 'vega-lite';
import type { ScenarioResult } from './scenario.js';

async function render(spec: TopLevelSpec, path: string): Promise<string> {
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: 'none' });
  writeFileSync(path, await view.toSVG());
  view.finalize();
  return path;
}

const base = { $schema: 'https://vega.github.io/schema/vega-lite/v6.json', width: 520, height: 300, background: 'white' } as const;

export function latencyCdf(rows: ScenarioResult[], title: string, path: string): Promise<string> {
  const values = rows.flatMap((r) => r.cdf.map(([us, fraction]) => ({ policy: r.policy, us: Math.max(us, 0.01), fraction })));
  return render(
    {
      ...base,
      title,
      data: { values },
      mark: { type: 'line', interpolate: 'step-after' },
      encoding: {
        x: { field: 'us', type: 'quantitative', title: 'first-touch latency (µs, log scale)', scale: { type: 'log' } },
        y: { field: 'fraction', type: 'quantitative', title: 'fraction of pages' },
        color: { field: 'policy', type: 'nominal' },
      },
    } as TopLevelSpec,
    path,
  );
}

export function residencyOverTime(rows: ScenarioResult[], title: string, path: string): Promise<string> {
  const values = rows.flatMap((r) => r.residency.map(([ms, pages]) => ({ policy: r.policy, ms, resident: pages / r.pages })));
  return render(
    {
      ...base,
      title,
      data: { values },
      mark: 'line',
      encoding: {
        x: { field: 'ms', type: 'quantitative', title: 'time since start (ms)' },
        y: { field: 'resident', type: 'quantitative', title: 'pages resident (fraction)', axis: { format: '%' } },
        color: { field: 'policy', type: 'nominal' },
      },
    } as TopLevelSpec,
    path,
  );
}

export function scaling(points: { mib: number; series: string; ms: number }[], path: string): Promise<string> {
  return render(scalingSpec(points), path);
}

/** The scaling plot: its size axis spans the sizes measured, not the next powers of ten around them. */
export function scalingSpec(points: { mib: number; series: string; ms: number }[]): TopLevelSpec {
  const sizes = points.map((p) => p.mib);
  const domain = sizes.length ? [Math.min(...sizes), Math.max(...sizes)] : [1, 2];
  return {
    ...base,
    title: 'Time to full residency (background stream) and random-workload time, by image size, unix socket',
    data: { values: points },
    mark: { type: 'line', point: true },
    encoding: {
      x: {
        field: 'mib',
        type: 'quantitative',
        title: 'image size (MiB, log scale)',
        scale: { type: 'log', domain, nice: false, base: 2 },
        axis: { values: [...new Set(sizes)].sort((a, b) => a - b) },
      },
      y: { field: 'ms', type: 'quantitative', title: 'ms (log scale)', scale: { type: 'log' } },
      color: { field: 'series', type: 'nominal', legend: { labelLimit: 400, orient: 'bottom', columns: 1 } },
    },
  } as TopLevelSpec;
}
