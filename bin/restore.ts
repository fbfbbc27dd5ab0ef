// postcopy restore: a destination that restores a source's image into memory
// of its own, optionally with a workload faulting pages in, and reports stats.
import { parseArgs } from 'node:util';
import { openSync, writeSync, closeSync } from 'node:fs';
import { Destination } from '../client/destination.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import type { Logger } from '../lib/logger.js';
import type { RestoreReport } from '../client/report.js';
import { parseCount, parseRecovery, parseSize, parseWindow, destinationToken, recoveryOptionSpec, recoveryUsage, startProgress } from './options.js';
import { UsageError } from './options.js';

export const restoreUsage = `postcopy restore --source unix:PATH|tcp:HOST:PORT [options]

  --token-file F         the token the source requires
  --out FILE             write the restored memory to FILE
  --window F:B           prefault window: F pages after, B before each request (default 8:2)
  --no-background        pure on-demand: no background stream
  --rate SIZE            background rate limit per second, e.g. 200M (default unlimited)
  --workload KIND        random (default): one thread touches every page in a
                         seeded random order; sequential; none: background only
  --seed N               workload seed (default 1)
  --json                 print the report as one JSON line
${recoveryUsage}`;

export async function restore(argv: string[], log: Logger): Promise<RestoreReport> {
  const { values } = parseArgs({
    args: argv,
    options: {
      source: { type: 'string' }, 'token-file': { type: 'string' }, out: { type: 'string' }, window: { type: 'string' },
      'no-background': { type: 'boolean' }, rate: { type: 'string' }, workload: { type: 'string' }, seed: { type: 'string' }, json: { type: 'boolean' },
      ...recoveryOptionSpec,
    },
    strict: true,
  });
  if (!values.source) throw new UsageError(restoreUsage);
  const workload = values.workload ?? 'random';
  if (!['random', 'sequential', 'none'].includes(workload)) throw new UsageError(restoreUsage);
  const window = parseWindow(values.window, restoreUsage);
  const dest = await Destination.connect({
    source: values.source,
    token: destinationToken(values['token-file'], values.source, log),
    logger: log,
    recovery: parseRecovery(values),
    ...(window ? { window } : {}),
    background: { enabled: !values['no-background'], rateBytesPerSecond: values.rate ? parseSize(values.rate, '--rate') : 0 },
  });
  const stopProgress = startProgress(() => dest.stats(), () => dest.status().state);
  try {
    const touching = dest.regions.map((r) => {
      if (workload === 'none') return Promise.resolve();
      const pages = r.mapping.length / r.info.pageSize;
      const order = workload === 'random' ? shuffledOrder(pages, parseCount(values.seed, '--seed', 1, 0xffffffff)) : Uint32Array.from({ length: pages }, (_, i) => i);
      return touchPages(r.mapping.address, pages, order, { pageSize: r.info.pageSize, mapping: r.mapping });
    });
    // Wait for the workload too, even when the restore fails: its threads are
    // released (never left touching unmapped memory) before anything is torn down.
    const [finished, ...touched] = await Promise.allSettled([dest.finish(), ...touching]);
    stopProgress();
    if (finished.status === 'rejected') throw finished.reason;
    for (const t of touched) if (t.status === 'rejected') throw t.reason;
    const report = finished.value;
    if (values.out) writeRegions(values.out, dest);
    if (values.json) process.stdout.write(JSON.stringify(report) + '\n');
    else process.stdout.write(formatReport(report));
    return report;
  } finally {
    dest.close();
  }
}

function writeRegions(path: string, dest: Destination): void {
  const fd = openSync(path, 'w', 0o600);
  try {
    let offset = 0;
    for (const r of dest.regions) {
      const bytes = r.mapping.buffer();
      for (let done = 0; done < bytes.length; ) done += writeSync(fd, bytes, done, bytes.length - done, offset + done);
      offset += bytes.length;
    }
  } finally {
    closeSync(fd);
  }
}

const n = (x: number) => x.toLocaleString('en-US');

export function formatReport(r: RestoreReport): string {
  const lat = r.faultLatencyUs;
  return [
    `pages        ${n(r.pages)} (${(r.bytes / 2 ** 20).toFixed(1)} MiB)`,
    `on demand    ${n(r.pagesOnDemand)}   prefetched (window) ${n(r.pagesPrefaulted)}   background ${n(r.pagesBackground)}   zero ${n(r.zeroPages)}   duplicates ${n(r.duplicatePages)}`,
    `faults       ${n(r.faults)}   latency p50 ${lat.p50} µs   p90 ${lat.p90} µs   p99 ${lat.p99} µs   max ${lat.max} µs`,
    `blocked      ${r.blockedMs} ms waiting in faults`,
    `resident     every page after ${r.fullResidencyMs} ms   ${(r.bytesReceived / 2 ** 20).toFixed(1)} MiB received`,
    ...(r.digestMatch === undefined ? [] : [`digest       ${r.digestMatch ? 'source = destination (sha256 ' + String((r.sha256 as string[])[0]).slice(0, 16) + '…)' : 'MISMATCH'}`]),
    '',
  ].join('\n');
}
