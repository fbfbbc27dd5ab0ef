// Plots rendered to SVG with vega-lite (no browser, no canvas): first-touch
// latency CDF per policy, pages resident over time per policy, and scaling.
// vega and vega-lite are optional peer dependencies: a library user never
// installs them; the bench draws its plots when they are there.
import { writeFileSync } from 'node:fs';
import type { TopLevelSpec } from 'vega-lite';
import type { ScenarioResult } from './scenario.js';

/** What the bench says when it cannot draw. */
export const PLOTS_NEED = 'plots not drawn: they need vega and vega-lite (npm install vega vega-lite)';

/** The plotting libraries, or null when they are not installed. */
export async function plotting(): Promise<{ vega: typeof import('vega'); vegaLite: typeof import('vega-lite') } | null> {
  try {
    const [vega, vegaLite] = await Promise.all([import('vega'), import('vega-lite')]);
    return { vega, vegaLite };
  } catch (err) {
    if ((err as { code?: string }).code === 'ERR_MODULE_NOT_FOUND') return null;
    throw err;
  }
}

async function render(spec: TopLevelSpec, path: string): Promise<string> {
  const libraries = await plotting();
  if (!libraries) throw new Error(PLOTS_NEED);
  const { vega, vegaLite } = libraries;
  const view = new vega.View(vega.parse(vegaLite.compile(spec).spec), { renderer: 'none' });
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
