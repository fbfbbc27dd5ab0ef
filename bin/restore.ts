// postcopy restore: a destination that restores a source's image into memory
// of its own, optionally with a workload faulting pages in, and reports stats.
import { openSync, writeSync, closeSync } from 'node:fs';
import { Destination } from '../client/destination.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import type { Logger } from '../lib/logger.js';
import type { RestoreReport } from '../client/report.js';
import { startProgress } from './terminal.js';
import {
  parseChoice,
  parseCommandLine,
  parseCount,
  parseRate,
  parseRecovery,
  parseWindow,
  destinationToken,
  recoveryOptionSpec,
  recoveryUsage,
  requireOptions,
  UsageError,
  checkWritable,
  parseAddressOption,
  loggingUsage,
} from './options.js';

export const restoreUsage = `postcopy restore --source unix:PATH|tcp:HOST:PORT [options]

  --source ADDRESS       again for each replica serving the same image: when
                         one is out of reach, the next is tried in turn
  --token-file F         the token the source requires
  --out FILE             write the restored memory to FILE
  --window F:B           prefault window: F pages after, B before each request (default 8:2)
  --no-background        pure on-demand: no background stream
  --rate SIZE            background rate limit per second, e.g. 200M (default unlimited)
  --workload KIND        random (default): one thread touches every page in a
                         seeded random order; sequential; none: background only
  --seed N               workload seed (default 1)
  --json                 print the report as one JSON line
${recoveryUsage}
${loggingUsage}`;

export async function restore(argv: string[], log: Logger): Promise<RestoreReport> {
  const values = parseCommandLine(argv, {
    source: { type: 'string', multiple: true },
    'token-file': { type: 'string' },
    out: { type: 'string' },
    window: { type: 'string' },
    'no-background': { type: 'boolean' },
    rate: { type: 'string' },
    workload: { type: 'string' },
    seed: { type: 'string' },
    json: { type: 'boolean' },
    ...recoveryOptionSpec,
  });
  requireOptions(values, ['source'], 'postcopy restore --source unix:PATH|tcp:HOST:PORT');
  const [source, ...replicas] = values.source as string[];
  for (const s of values.source as string[]) parseAddressOption(s, '--source');
  const workload = parseChoice(values.workload, '--workload', ['random', 'sequential', 'none'] as const, 'random');
  const seed = parseCount(values.seed, '--seed', 1, 0xffffffff);
  const window = parseWindow(values.window);
  const rate = parseRate(values.rate);
  const recovery = parseRecovery(values);
  if (values['no-background'] && values.rate !== undefined)
    throw new UsageError('--rate limits the background stream, which --no-background turns off: give one or the other');
  if (values.seed !== undefined && workload !== 'random') throw new UsageError(`--seed orders the random workload; --workload ${workload} has no use for it`);
  if (values['no-background'] && workload === 'none') {
    throw new UsageError('--no-background with --workload none can never finish: nothing would fault pages in and nothing would stream them');
  }
  if (values.out) checkWritable(values.out, '--out');
  const dest = await Destination.connect({
    source,
    replicas,
    token: destinationToken(values['token-file'], source, log),
    logger: log,
    recovery,
    ...(window ? { window } : {}),
    background: { enabled: !values['no-background'], rateBytesPerSecond: rate },
  });
  const stopProgress = startProgress(
    () => dest.stats(),
    () => dest.status().state,
  );
  try {
    const touching = dest.regions.map((r) => {
      if (workload === 'none') return Promise.resolve();
      const pages = r.mapping.length / r.info.pageSize;
      const order = workload === 'random' ? shuffledOrder(pages, seed) : Uint32Array.from({ length: pages }, (_, i) => i);
      return touchPages(r.mapping.address, pages, order, { pageSize: r.info.pageSize, mapping: r.mapping });
    });
    // Wait for the workload too, even when the restore fails: its threads are
    // released (never left touching unmapped memory) before anything is torn down.
    const [finished, ...touched] = await Promise.allSettled([dest.finish(), ...touching]);
    stopProgress();
    if (finished.status === 'rejected') {
      const failedReport = (finished.reason as { details?: { report?: RestoreReport } }).details?.report;
      if (failedReport) process.stdout.write(values.json ? JSON.stringify(failedReport) + '\n' : formatReport(failedReport));
      throw finished.reason;
    }
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

/** The image as the source holds it: each region's own bytes (not its padding to whole pages), end to end. */
function writeRegions(path: string, dest: Destination): void {
  const fd = openSync(path, 'w', 0o600);
  try {
    let offset = 0;
    for (const r of dest.regions) {
      const bytes = r.mapping.buffer().subarray(0, r.info.contentLength ?? r.info.length);
      for (let done = 0; done < bytes.length;) done += writeSync(fd, bytes, done, bytes.length - done, offset + done);
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
    ...(r.digestMatch === undefined
      ? []
      : [`digest       ${r.digestMatch ? 'source = destination (sha256 ' + String((r.sha256 as string[])[0]).slice(0, 16) + '…)' : 'MISMATCH'}`]),
    '',
  ].join('\n');
}
