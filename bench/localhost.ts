// postcopy bench localhost: memory on one host, sampled every 10 ms. A move
// (copy, release-as-sent, in place) counts what it holds itself: the
// anonymous memory of every process the bench started for it (Node, about 50
// MB each, included) and the shared memory of the files in its tmpfs
// directory (the image, and what the source keeps beside it), so that other
// work on a shared host does not count. Clones count the host's
// /proc/meminfo (AnonPages + Shmem, the bench process's own heap left out:
// their template is in memfds) over what the host held before.
//   copy             a move of an image on tmpfs: `serve`, then `restore`
//                    into the destination's own memory (both copies at the end)
//   release-as-sent  the same with `serve --release-as-sent`: each page freed
//                    at the source once the destination has installed it
//   in-place         `restore --in-place`: the destination maps the source's
//                    memory itself
//   clones           N clones of one image through `handle --template`: the
//                    source (in this process, image on tmpfs), the handler
//                    (the template) and N VMM fixtures, each reading every
//                    page of its guest memory and checking it against the
//                    image; beside the same N VMMs through a plain handler
// Ratios are over the image's size: peakMemoryRatio counts both sides (the
// source's image too), totalMemoryRatio the destination side only (template
// and clones), pagesFetchedRatio the pages the source sent over the image's.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createHash } from 'node:crypto';
import { closeSync, createReadStream, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { buildFixture } from '../lib/c-programs.js';
import { selfCommand } from '../lib/package-root.js';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { runCliJson, startSource } from './source.js';
import { round } from './latency.js';
import { removeScratchDir, scratchDir, stopAtExit } from './cleanup.js';

export interface MoveResult {
  case: 'copy' | 'release-as-sent' | 'in-place';
  imageBytes: number;
  digestMatch: boolean;
  /** Peak memory of source and destination together, over the image's size. */
  peakMemoryRatio: number;
  /** From starting the destination to its report (every page in and checked). */
  ms: number;
}

export interface ClonesResult {
  case: 'clones';
  clones: number;
  imageBytes: number;
  /** Every clone saw the image byte for byte (and no handler check found a page that differs). */
  digestMatch: boolean;
  /** Peak memory of the source (its image), the handler and every clone, over the image's size. */
  peakMemoryRatio: number;
  /** Peak memory of the destination side only (the template and every clone), over the image's size. */
  totalMemoryRatio: number;
  /** Pages the source sent, over the image's pages. */
  pagesFetchedRatio: number;
  /** From a clone's start to its workload's end (every page read and checked): median and slowest. */
  cloneMs: { p50: number; max: number };
  /** The same N VMMs through a plain handler (each guest gets its own copy), measured in the same run. */
  withoutTemplate: Pick<ClonesResult, 'digestMatch' | 'peakMemoryRatio' | 'totalMemoryRatio' | 'pagesFetchedRatio' | 'cloneMs'>;
}

export type LocalhostResult = MoveResult | ClonesResult;

/**
 * Bytes of anonymous and shared memory on the host now, less this process's
 * own anonymous memory: the bench's heap (and its garbage, freed whenever the
 * collector runs) is no part of a move; the processes it starts are.
 */
function memoryInUse(): number {
  const kb = (text: string, name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0);
  const info = readFileSync('/proc/meminfo', 'utf8');
  const self = readFileSync('/proc/self/status', 'utf8');
  return (kb(info, 'AnonPages') + kb(info, 'Shmem') - kb(self, 'RssAnon')) * 1024;
}

/** The processes this process started, and theirs, recursively. */
function descendants(pid: number): number[] {
  const out: number[] = [];
  let tasks: string[] = [];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out; // exited meanwhile
  }
  for (const task of tasks) {
    let children = '';
    try {
      children = readFileSync(`/proc/${pid}/task/${task}/children`, 'utf8');
    } catch {
      continue;
    }
    for (const child of children.split(' ').filter(Boolean).map(Number)) out.push(child, ...descendants(child));
  }
  return out;
}

/** Bytes a move holds: the anonymous memory of the processes it started, and the files in its tmpfs directory. */
function moveMemory(dir: string): number {
  let bytes = 0;
  for (const pid of descendants(process.pid)) {
    try {
      bytes += Number(/^RssAnon:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0) * 1024;
    } catch {
      // exited meanwhile
    }
  }
  for (const name of readdirSync(dir)) {
    try {
      bytes += statSync(join(dir, name)).blocks * 512;
    } catch {
      // removed meanwhile
    }
  }
  return bytes;
}

/** Samples `measure` every 10 ms until stop(), which returns the peak. */
function sampleMemory(measure: () => number = memoryInUse): { stop(): number } {
  let peak = measure();
  const timer = setInterval(() => (peak = Math.max(peak, measure())), 10);
  return {
    stop() {
      clearInterval(timer);
      return Math.max(peak, measure());
    },
  };
}

/** Writes an image of `bytes` (every page different, none zero) to `path`. */
export function writePatternImage(path: string, bytes: number): void {
  const chunk = Buffer.alloc(4 << 20);
  for (let i = 0; i < chunk.length; i += 4) chunk.writeUInt32LE((Math.imul(i, 2654435761) ^ (i >>> 7)) >>> 0, i);
  const fd = openSync(path, 'w', 0o600);
  try {
    for (let at = 0; at < bytes; at += chunk.length) {
      for (let p = 0; p < chunk.length; p += 4096) chunk.writeUInt32LE((at + p) / 4096, p); // the page's own number first
      writeSync(fd, chunk, 0, Math.min(chunk.length, bytes - at), at);
    }
  } finally {
    closeSync(fd);
  }
}

async function fileSha256(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 << 20 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Waits (up to 5 s) for the host's memory to settle back near `baseline` after a case. */
async function settle(baseline: number, slack: number): Promise<void> {
  for (let i = 0; i < 500 && memoryInUse() > baseline + slack; i++) await new Promise((r) => setTimeout(r, 10));
}

async function move(kind: MoveResult['case'], bytes: number, parent: string): Promise<MoveResult> {
  const dir = mkdtempSync(join(parent, `move-${kind}-`));
  const baseline = moveMemory(dir);
  const path = join(dir, `move-${kind}.img`);
  const sampler = sampleMemory(() => moveMemory(dir));
  writePatternImage(path, bytes);
  const source = await startSource(path, `unix:${join(dir, `move-${kind}.sock`)}`, kind === 'release-as-sent' ? { extra: ['--release-as-sent'] } : {});
  try {
    const started = performance.now();
    const report = await runCliJson(['restore', '--source', source.address, '--json', '--workload', 'none', ...(kind === 'in-place' ? ['--in-place'] : [])]);
    const ms = performance.now() - started;
    const peak = sampler.stop();
    // In place, the destination hashes the memory it mapped; the image's own hash is taken here (after the peak).
    const digestMatch = kind === 'in-place' ? (report.sha256 as string[] | undefined)?.[0] === (await fileSha256(path)) : report.digestMatch === true;
    return { case: kind, imageBytes: bytes, digestMatch, peakMemoryRatio: round((peak - baseline) / bytes, 3), ms: round(ms, 1) };
  } finally {
    sampler.stop();
    await source.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

type CloneRun = ClonesResult['withoutTemplate'];

async function clones(n: number, bytes: number, dir: string, template: boolean): Promise<CloneRun> {
  const baseline = memoryInUse();
  const sampler = sampleMemory();
  const path = join(dir, `clones-${n}.img`);
  writePatternImage(path, bytes);
  const image = Image.open([{ path }]);
  const server = new PageServer({ image });
  const handlerSocket = join(dir, `handler-${n}.sock`);
  const [cmd, ...pre] = selfCommand();
  let handler: ReturnType<typeof spawn> | null = null;
  try {
    const where = await server.listen(`unix:${join(dir, `source-${n}.sock`)}`);
    // The destination side starts here: what the host holds beyond this is the template's and the clones'.
    const sourceSide = memoryInUse();
    const destination = sampleMemory();
    handler = stopAtExit(
      spawn(
        cmd,
        [
          ...pre,
          'handle',
          '--socket',
          handlerSocket,
          '--source',
          `unix:${(where as { path: string }).path}`,
          ...(template ? ['--template', 'bench'] : ['--single-process']),
          '--log-level',
          'warn',
        ],
        { stdio: ['ignore', 'pipe', 'inherit'] },
      ),
    );
    const lines = createInterface({ input: handler.stdout! })[Symbol.asyncIterator]();
    await lines.next(); // listening
    const runs = await Promise.all(
      Array.from({ length: n }, async (_, i) => {
        const started = performance.now();
        const mode = template ? ['--template'] : [];
        const child = stopAtExit(
          spawn(buildFixture('vmm'), ['--socket', handlerSocket, '--image', path, ...mode, '--threads', '1', '--seed', String(i + 1)], {
            stdio: ['ignore', 'pipe', 'inherit'],
          }),
        );
        let out = '';
        child.stdout.on('data', (d) => (out += d));
        const [code] = await once(child, 'close');
        return { ok: code === 0 && JSON.parse(out.trim() || '{}').ok === true, ms: performance.now() - started };
      }),
    );
    const summaries: { installedCheck?: { result?: string } | null }[] = [];
    for (let i = 0; i < n; i++) summaries.push(JSON.parse((await lines.next()).value));
    const peakDestination = destination.stop();
    const peak = sampler.stop();
    const figures = server.figures();
    const sent = figures.pagesRequested - figures.pagesResent + figures.pagesWindow + figures.pagesBackground;
    const ms = runs.map((r) => r.ms).sort((a, b) => a - b);
    return {
      // Each VMM compared every page of its memory with the image; no handler check (if it ran before the VMM left) disagreed.
      digestMatch: runs.every((r) => r.ok) && summaries.every((s) => s.installedCheck?.result !== 'mismatch'),
      peakMemoryRatio: round((peak - baseline) / bytes, 3),
      totalMemoryRatio: round((peakDestination - sourceSide) / bytes, 3),
      pagesFetchedRatio: round(sent / (bytes / 4096), 3),
      cloneMs: { p50: round(ms[Math.floor(ms.length / 2)], 1), max: round(ms[ms.length - 1], 1) },
    };
  } finally {
    sampler.stop();
    if (handler && handler.exitCode === null) {
      const exited = once(handler, 'exit');
      handler.kill('SIGTERM');
      await exited;
    }
    await server.close();
    image.close();
    rmSync(path, { force: true });
    await settle(baseline, bytes / 20);
  }
}

/** Every case, one after the other (never two at once: each owns the host's memory figure while it runs). */
export async function localhostBench(
  moveBytes: number,
  cloneBytes: number,
  cloneCounts: number[],
  progress: (line: string) => void,
): Promise<LocalhostResult[]> {
  const dir = scratchDir('uffd-postcopy-bench-', '/dev/shm');
  const results: LocalhostResult[] = [];
  try {
    for (const kind of ['copy', 'release-as-sent', 'in-place'] as const) {
      progress(`localhost: ${kind}, a ${moveBytes >> 20} MiB move`);
      results.push(await move(kind, moveBytes, dir));
    }
    for (const n of cloneCounts) {
      progress(`localhost: ${n} clone${n > 1 ? 's' : ''} of a ${cloneBytes >> 20} MiB image, with a template and without`);
      const shared = await clones(n, cloneBytes, dir, true);
      const withoutTemplate = await clones(n, cloneBytes, dir, false);
      results.push({ case: 'clones', clones: n, imageBytes: cloneBytes, ...shared, withoutTemplate });
    }
  } finally {
    removeScratchDir(dir);
  }
  return results;
}

/** The results as a Markdown table. */
export function localhostTable(results: LocalhostResult[]): string {
  const rows = results.map((r) =>
    r.case === 'clones'
      ? [
          `| clones x${r.clones} (template) | ${r.imageBytes >> 20} MiB | ${r.peakMemoryRatio} | ${r.totalMemoryRatio} | ${r.pagesFetchedRatio} | ${r.cloneMs.p50} / ${r.cloneMs.max} ms | ${r.digestMatch} |`,
          `| clones x${r.clones} (no template) | ${r.imageBytes >> 20} MiB | ${r.withoutTemplate.peakMemoryRatio} | ${r.withoutTemplate.totalMemoryRatio} | ${r.withoutTemplate.pagesFetchedRatio} | ${r.withoutTemplate.cloneMs.p50} / ${r.withoutTemplate.cloneMs.max} ms | ${r.withoutTemplate.digestMatch} |`,
        ].join('\n')
      : `| ${r.case} | ${r.imageBytes >> 20} MiB | ${r.peakMemoryRatio} | | | ${r.ms} ms | ${r.digestMatch} |`,
  );
  return [
    '| case | image | peak memory (both sides) / image | destination memory / image | pages sent / image | time (clones: p50 / slowest) | digest match |',
    '| --- | --- | --- | --- | --- | --- | --- |',
    ...rows,
    '',
  ].join('\n');
}
