// postcopy restore: a destination that restores an image into memory of its
// own, from a source or from a local image file, optionally with a workload
// faulting pages in, and reports stats.
import { openSync, writeSync, closeSync, fsyncSync, realpathSync, renameSync, rmSync, statSync, fchmodSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Destination } from '../client/destination.js';
import type { TakenMemory } from '../client/open-session.js';
import { PAGE_SIZE } from '../lib/memory.js';
import { digestOf } from '../lib/digest.js';
import { Image } from '../lib/image.js';
import { coldStartOrder, shuffledOrder, touchPages } from '../lib/workload.js';
import { pagesIn, readWorkingSet, writeWorkingSet } from '../client/working-set.js';
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
  withTokenFile,
  recoveryOptionSpec,
  UsageError,
  checkWritable,
  parseAddressOption,
  parseStoreOptions,
  storeOptionSpec,
  storeImageOf,
} from './options.js';
import { parseImageUrl } from '../lib/store/address.js';

export async function restore(argv: string[], log: Logger): Promise<void> {
  const values = parseCommandLine(argv, {
    source: { type: 'string', multiple: true },
    image: { type: 'string', multiple: true },
    'record-working-set': { type: 'string' },
    prefetch: { type: 'string' },
    'in-place': { type: 'boolean' },
    thp: { type: 'boolean' },
    'token-file': { type: 'string' },
    out: { type: 'string' },
    window: { type: 'string' },
    'no-background': { type: 'boolean' },
    rate: { type: 'string' },
    workload: { type: 'string' },
    seed: { type: 'string' },
    json: { type: 'boolean' },
    ...recoveryOptionSpec,
    ...storeOptionSpec,
  });
  const storeImage = storeImageOf(values.image);
  const { cache, tenant } = parseStoreOptions(values, storeImage !== undefined);
  if (storeImage)
    try {
      parseImageUrl(storeImage);
    } catch (err) {
      throw new UsageError(`--image ${(err as Error).message}`);
    }
  if (values.image && values.source) throw new UsageError('--image restores from a local file, --source from a source: give one or the other');
  if (!values.image && !values.source?.length)
    throw new UsageError('--source or --image is required (postcopy restore --source unix:PATH|tcp:HOST:PORT, or --image FILE|s3://BUCKET/PREFIX/NAME)');
  for (const s of values.source ?? []) parseAddressOption(s, '--source');
  const workload = parseChoice(values.workload, '--workload', ['random', 'sequential', 'cold-start', 'none'] as const, 'random');
  const seed = parseCount(values.seed, '--seed', 1, 0xffffffff);
  const window = parseWindow(values.window);
  const rate = parseRate(values.rate);
  const recovery = parseRecovery(values);
  if (values['no-background'] && values.rate !== undefined)
    throw new UsageError('--rate limits the background stream, which --no-background turns off: give one or the other');
  if (values.seed !== undefined && workload !== 'random' && workload !== 'cold-start')
    throw new UsageError(`--seed orders the random and cold-start workloads; --workload ${workload} has no use for it`);
  const record = values['record-working-set'];
  if (record !== undefined) {
    if (workload === 'none') throw new UsageError('--record-working-set records what the workload touches; --workload none touches nothing');
    if (values.window !== undefined)
      throw new UsageError('--record-working-set serves each fault alone (no window), so the set holds exactly the pages touched: drop --window');
    if (values.prefetch !== undefined)
      throw new UsageError('--record-working-set and --prefetch: record without a replay, so the set holds every page touched');
    checkWritable(record, '--record-working-set');
  }
  const prefetch = values.prefetch === undefined ? undefined : readWorkingSet(values.prefetch);
  const inPlace = values['in-place'] === true;
  if (inPlace) {
    if (values.image) throw new UsageError('--in-place takes the memory of a source (--source); --image restores from a file here');
    for (const name of ['record-working-set', 'prefetch', 'window', 'rate', 'no-background', 'thp'] as const)
      if (values[name] !== undefined) throw new UsageError(`--in-place copies no page, so --${name} has nothing to act on`);
  }
  if (values['no-background'] && workload === 'cold-start')
    throw new UsageError('--no-background with --workload cold-start can never finish: the pages the cold start does not touch would never arrive');
  if (values['no-background'] && workload === 'none') {
    throw new UsageError('--no-background with --workload none can never finish: nothing would fault pages in and nothing would stream them');
  }
  if (values.out) {
    checkWritable(values.out, '--out');
    if (values.image)
      refuseImageAsOut(
        values.out,
        values.image.flatMap((path) => statSync(path, { throwIfNoEntry: false }) ?? []),
      );
  }
  const transfer = {
    logger: log,
    ...(record !== undefined ? { window: { forward: 0, backward: 0 }, holdBackground: true, recordWorkingSet: true } : window ? { window } : {}),
    ...(prefetch ? { prefetch } : {}),
    background: { enabled: !values['no-background'], rateBytesPerSecond: rate },
    ...(values.thp ? { transparentHugePages: true } : {}),
  };
  const image = values.image && !storeImage ? Image.open(values.image.map((path) => ({ path }))) : undefined;
  let dest: Destination;
  try {
    if (storeImage) {
      dest = await Destination.connect({ storeImage, cache, ...(tenant ? { tenant } : {}), recovery, ...transfer });
    } else if (image) {
      dest = await Destination.connect({ image, ...transfer });
    } else {
      const [source, ...replicas] = values.source as string[];
      const opened = await Destination.open({ source, replicas, token: destinationToken(values['token-file'], source, log), recovery, inPlace, ...transfer });
      if (!(opened instanceof Destination)) {
        const taken = await useInPlace(opened, workload, seed, values.out);
        process.stdout.write(values.json ? JSON.stringify(taken) + '\n' : formatInPlace(taken));
        return;
      }
      dest = opened;
    }
  } catch (err) {
    image?.close();
    throw values.source ? withTokenFile(err, values['token-file'], values.source[0]) : err;
  }
  const stopProgress = startProgress(
    () => dest.stats(),
    () => dest.status().state,
  );
  // Ctrl-C (or a service manager's stop): say what was interrupted and that nothing was written, and tell the
  // source goodbye (it lets the session go at once instead of holding it for a resume).
  let wrote = false;
  const interrupted = (signal: NodeJS.Signals) => {
    stopProgress();
    const s = dest.stats();
    const resident = s.totalPages ? ((100 * s.residentPages) / s.totalPages).toFixed(1) : '0';
    dest.close();
    process.stderr.write(
      `postcopy restore: interrupted (${signal}) with ${resident}% of the image resident; ` +
        `${values.out ? (wrote ? `${values.out} was written before` : `nothing was written to ${values.out}`) : 'nothing was written'}; the source was told goodbye\n`,
    );
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', interrupted);
  process.once('SIGTERM', interrupted);
  try {
    // A live source: its workload runs here from its switchover on (its precopy rounds come first).
    await dest.session.whenRunning().catch((err) => {
      stopProgress();
      throw err;
    });
    let faultsFirstSecond: number | undefined;
    const firstSecond = setTimeout(() => (faultsFirstSecond = dest.stats().faults), 1000);
    const touching = dest.regions.map((r) => {
      if (workload === 'none') return Promise.resolve();
      const pages = r.mapping.length / r.info.pageSize;
      return touchPages(r.mapping.address, pages, workloadOrder(workload, pages, seed), { pageSize: r.info.pageSize, mapping: r.mapping });
    });
    // While recording, the background waits for the workload: it must not install a page before the workload touches it.
    if (record !== undefined) void Promise.allSettled(touching).then(() => dest.session.startBackground());
    const workloadDone = Promise.all(touching).then((results) => Math.max(0, ...results.map((t) => (t ? t.totalNs : 0))) / 1e6);
    workloadDone.catch(() => {}); // a failed workload is reported below, from `touched`
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
    clearTimeout(firstSecond);
    const report: RestoreReport = { ...finished.value, ...(workload !== 'none' ? { workloadMs: Math.round((await workloadDone) * 100) / 100 } : {}) };
    // Faults in the first second the workload ran here (all of them, when it was over sooner).
    if (report.precopy) report.faultsFirstSecond = faultsFirstSecond ?? report.faults;
    if (record !== undefined) {
      const set = dest.workingSet();
      writeWorkingSet(record, set);
      report.workingSet = { recorded: pagesIn(set), file: record };
    }
    if (prefetch) report.workingSet = { replayed: pagesIn(prefetch) };
    if (values.out) {
      writeRegions(values.out, dest);
      wrote = true;
    }
    if (values.json) process.stdout.write(JSON.stringify(report) + '\n');
    else process.stdout.write(formatReport(report));
  } finally {
    process.off('SIGINT', interrupted);
    process.off('SIGTERM', interrupted);
    dest.close();
    image?.close();
  }
}

type Workload = 'random' | 'sequential' | 'cold-start' | 'none';

/** The order in which `workload` touches a region of `pages` pages. */
function workloadOrder(workload: Exclude<Workload, 'none'>, pages: number, seed: number): Uint32Array {
  if (workload === 'random') return shuffledOrder(pages, seed);
  if (workload === 'cold-start') return coldStartOrder(pages, seed);
  return Uint32Array.from({ length: pages }, (_, i) => i);
}

interface InPlaceReport {
  inPlace: true;
  pages: number;
  bytes: number;
  /** Nothing crossed a socket but the fds. */
  bytesReceived: 0;
  regions: number;
  /** From asking the source to the memory being mapped here. */
  tookMs: number;
  workloadMs?: number;
  sha256: string[];
}

/** In place: the source's memory, mapped here (nothing copied, nothing faults), under the workload; then the report. */
async function useInPlace(taken: TakenMemory, workload: Workload, seed: number, out: string | undefined): Promise<InPlaceReport> {
  const { mappings } = taken;
  try {
    // The memory taken is the image's file itself: writing --out over it would destroy what we read from.
    if (out) refuseImageAsOut(out, taken.files);
    let workloadMs: number | undefined;
    if (workload !== 'none') {
      const touched = await Promise.all(
        mappings.map((m) => {
          const pages = m.length / PAGE_SIZE;
          return touchPages(m.address, pages, workloadOrder(workload, pages, seed), { mapping: m });
        }),
      );
      workloadMs = Math.round(Math.max(...touched.map((t) => t.totalNs)) / 1e4) / 100;
    }
    const sha256 = await Promise.all(mappings.map((m) => digestOf(m.buffer())));
    if (out)
      writeBytes(
        out,
        taken.regions.map((r, i) => mappings[i].buffer().subarray(0, r.contentLength ?? r.length)),
      );
    const bytes = mappings.reduce((n, m) => n + m.length, 0);
    return {
      inPlace: true,
      pages: bytes / PAGE_SIZE,
      bytes,
      bytesReceived: 0,
      regions: mappings.length,
      tookMs: Math.round(taken.tookMs * 100) / 100,
      ...(workloadMs !== undefined ? { workloadMs } : {}),
      sha256,
    };
  } finally {
    for (const m of mappings) m.unmap();
  }
}

function formatInPlace(r: InPlaceReport): string {
  return [
    `in place     ${n(r.pages)} pages (${(r.bytes / 2 ** 20).toFixed(1)} MiB) in ${r.regions} region(s), taken in ${r.tookMs} ms: the source's own memory, nothing copied`,
    ...(r.workloadMs !== undefined ? [`workload     ${r.workloadMs} ms, no faults`] : []),
    `sha256       ${r.sha256.map((d) => d.slice(0, 16) + '…').join(' ')}`,
    '',
  ].join('\n');
}

/** The image as the source holds it: each region's own bytes (not its padding to whole pages), end to end. */
function writeRegions(path: string, dest: Destination): void {
  writeBytes(
    path,
    dest.regions.map((r) => r.mapping.buffer().subarray(0, r.info.contentLength ?? r.info.length)),
  );
}

/**
 * Refuses an --out that is one of the image's files (the same device and
 * inode, whatever the name: another path, a symlink, a hard link): a restore
 * reads the image, so writing over it would destroy the image.
 */
function refuseImageAsOut(out: string, images: { dev: number; ino: number }[]): void {
  const target = statSync(out, { throwIfNoEntry: false });
  if (target && images.some((i) => i.dev === target.dev && i.ino === target.ino))
    throw new UsageError(`--out ${out} is the image being restored (the same file): writing it would destroy the image; give another path`);
}

/**
 * Writes the pieces end to end to a new file beside `path` (0600, or the mode
 * of the file it replaces), then renames it over `path`: an existing file is
 * replaced whole or not at all. A symlink is followed: its target is replaced.
 */
function writeBytes(path: string, pieces: Uint8Array[]): void {
  let target = path;
  try {
    target = realpathSync(path);
  } catch {
    // Not there yet: written under its own name.
  }
  const existing = statSync(target, { throwIfNoEntry: false });
  const temp = join(dirname(target), `.${basename(target)}.postcopy-${randomBytes(6).toString('hex')}`);
  const fd = openSync(temp, 'wx', 0o600);
  try {
    try {
      if (existing) fchmodSync(fd, existing.mode & 0o7777);
      let offset = 0;
      for (const bytes of pieces) {
        for (let done = 0; done < bytes.length;) done += writeSync(fd, bytes, done, bytes.length - done, offset + done);
        offset += bytes.length;
      }
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(temp, target);
  } catch (err) {
    rmSync(temp, { force: true });
    throw err;
  }
}

const n = (x: number) => x.toLocaleString('en-US');

export function formatReport(r: RestoreReport): string {
  const lat = r.faultLatencyUs;
  const recovery = r.recovery as { resumes?: number; pausedMs?: number } | undefined;
  const pre = r.precopy;
  return [
    `pages        ${n(r.pages)} (${(r.bytes / 2 ** 20).toFixed(1)} MiB)`,
    `on demand    ${n(r.pagesOnDemand)}   window ${n(r.pagesWindow)}   working set ${n(r.pagesPrefetched)}   background ${n(r.pagesBackground)}   zero ${n(r.zeroPages)}   duplicates ${n(r.duplicatePages)}`,
    ...(pre
      ? [
          `precopied    ${n(pre.pagesPrecopied)} before the switchover at ${duration(pre.switchoverMs)}   written again ${n(pre.pagesRewritten)}   dropped ${n(pre.pagesDiscarded)}`,
        ]
      : []),
    lat.count === 0 && r.faults === 0
      ? 'faults       none'
      : `faults       ${n(r.faults)}   latency p50 ${lat.p50} µs   p90 ${lat.p90} µs   p99 ${lat.p99} µs   max ${lat.max} µs`,
    `blocked      ${duration(r.blockedMs)} waiting in faults`,
    `resident     every page after ${duration(r.fullResidencyMs)}   ${(r.bytesReceived / 2 ** 20).toFixed(1)} MiB received`,
    ...(recovery?.resumes || recovery?.pausedMs
      ? [`paused       ${duration(recovery.pausedMs ?? 0)} with the source out of reach   resumed ${n(recovery.resumes ?? 0)} time(s)`]
      : []),
    ...(r.digestMatch === undefined
      ? []
      : [`digest       ${r.digestMatch ? 'source = destination (sha256 ' + String((r.sha256 as string[])[0]).slice(0, 16) + '…)' : 'MISMATCH'}`]),
    '',
  ].join('\n');
}

/** A time as a person reads it: milliseconds below a second, seconds from a second up (7.75 s, not 7753.01 ms). */
function duration(ms: number): string {
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
}
