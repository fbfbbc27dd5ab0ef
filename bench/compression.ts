// postcopy bench compression: what packed runs save across a slow link. Each
// image is served across a veth pair shaped to 1 Gbit/s (bench/links.ts) and
// restored whole (background on, no workload), with packed runs and with the
// destination refusing them, interleaved round by round: bytes on the wire
// over the image's raw bytes, time to full residency, and CPU on both sides
// per GiB of image (the source's whole process, the destination's engine threads). Images: a synthetic one with a realistic mix of pages
// (zero, text-like, structured, random), and the QEMU test guest's RAM as
// `postcopy qemu import` wrote it from QEMU's own save (when QEMU is here).
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Destination } from '../client/destination.js';
import { LINKS, bringUp } from './links.js';
import { median, round } from './latency.js';
import { cpuSince, processCpuNs, threadSamples } from './source.js';
import { removeScratchDir, scratchDir } from './cleanup.js';

export const IMAGE_KINDS = ['synthetic', 'guest'] as const;
export type ImageKind = (typeof IMAGE_KINDS)[number];

interface Run {
  packed: boolean;
  wireBytes: number;
  fullResidencyMs: number;
  sourceCpuMs: number;
  destinationCpuMs: number;
  packedRuns: number;
}

export interface CompressionResult {
  case: 'compression';
  image: ImageKind;
  link: string;
  rawBytes: number;
  rounds: number;
  /** Bytes on the wire over the image's raw bytes, packed runs on (the median of the rounds) and off (zero pages only skipped). */
  wireBytesRatio: number;
  plainWireBytesRatio: number;
  wireBytesRatioSpread: [number, number];
  /** Time to full residency, packed over not (median of the per-round ratios). */
  timeRatio: number;
  timeRatioSpread: [number, number];
  packed: { fullResidencyMs: number; sourceCpuMsPerGiB: number; destinationCpuMsPerGiB: number };
  plain: { fullResidencyMs: number; sourceCpuMsPerGiB: number; destinationCpuMsPerGiB: number };
  runs: Run[];
}

export type CompressionOutcome = CompressionResult | { case: 'compression'; image: ImageKind; skipped: string };

/**
 * `pages` pages in stretches of 16: a third zero, a quarter text-like (words
 * and numbers, as heaps and page caches hold), a quarter structured (records
 * of small integers and pointers, as data structures and code hold), the
 * rest random (compressed or encrypted data).
 */
export function syntheticImage(path: string, pages: number, seed = 1): void {
  const page = 4096;
  const image = Buffer.alloc(pages * page);
  const words = [
    'the',
    'page',
    'fault',
    'memory',
    'restore',
    'kernel',
    'thread',
    'return',
    'error',
    'value',
    'struct',
    'const',
    'null',
    'json',
    'http',
    'user',
  ];
  let x = seed >>> 0 || 1;
  const next = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0), x >>> 8);
  for (let p = 0; p < pages; p++) {
    const at = image.subarray(p * page, (p + 1) * page);
    const kind = Math.floor(p / 16) % 12; // 4 zero, 3 text, 3 structured, 2 random
    if (kind < 4) continue;
    if (kind < 7) {
      let text = '';
      while (text.length < page) text += `${words[next() % words.length]}${next() % 5 === 0 ? ` ${next() % 10000}` : ''}${next() % 9 === 0 ? '\n' : ' '}`;
      at.write(text.slice(0, page), 'latin1');
    } else if (kind < 10) {
      for (let o = 0; o + 32 <= page; o += 32) {
        at.writeUInt32LE(next() % 256, o);
        at.writeUInt32LE(p, o + 4);
        at.writeBigUInt64LE(0x7f3a_0000_0000n + BigInt((next() % 65536) * 64), o + 8);
        at.writeUInt32LE(next() % 3, o + 16);
      }
    } else {
      randomBytes(page).copy(at);
    }
  }
  writeFileSync(path, image);
}

async function once(address: string, token: string | undefined, sourcePid: number, packed: boolean): Promise<Run> {
  const srcBefore = processCpuNs(sourcePid);
  const dstBefore = threadSamples('self');
  const dest = await Destination.connect({ source: address, token, refusePackedRuns: !packed, background: { enabled: true, rateBytesPerSecond: 0 } });
  try {
    await dest.engine.whenResident();
    // CPU read while the sessions' threads still live.
    const sourceCpuMs = round((processCpuNs(sourcePid) - srcBefore) / 1e6);
    const destinationCpuMs = round(cpuSince(dstBefore, threadSamples('self'), (n) => n.startsWith('pc-')) / 1e6);
    const report = await dest.finish();
    const stats = dest.stats();
    if (!report.digestMatch) throw new Error('the restored memory differs from the image');
    return {
      packed,
      wireBytes: stats.bytesReceived,
      fullResidencyMs: round(stats.fullResidencyNs / 1e6),
      sourceCpuMs,
      destinationCpuMs,
      packedRuns: stats.packedRuns,
    };
  } finally {
    dest.close();
  }
}

function qemuHere(): boolean {
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** The image of one kind in `dir`, or why it cannot be had here. */
async function imageOf(
  kind: ImageKind,
  dir: string,
  pages: number,
  children: ChildProcess[],
  progress: (line: string) => void,
): Promise<string | { skipped: string }> {
  if (kind === 'synthetic') {
    const path = join(dir, 'synthetic.img');
    syntheticImage(path, pages);
    return path;
  }
  if (!qemuHere()) return { skipped: 'qemu-system-x86_64 is not installed' };
  const { savedTestGuest } = await import('./qemu.js');
  const { snapshot } = await savedTestGuest(dir, 64, children, progress);
  for (const c of children) c.kill('SIGKILL');
  return join(snapshot, 'ram-0.img');
}

export async function compressionBench(
  pages: number,
  rounds: number,
  kinds: readonly ImageKind[],
  progress: (line: string) => void = () => {},
): Promise<CompressionOutcome[]> {
  const out: CompressionOutcome[] = [];
  const dir = scratchDir('postcopy-bench-compression-');
  const children: ChildProcess[] = [];
  try {
    for (const kind of kinds) {
      const image = await imageOf(kind, dir, pages, children, progress);
      if (typeof image !== 'string') {
        out.push({ case: 'compression', image: kind, ...image });
        continue;
      }
      const link = await bringUp(
        LINKS.find((l) => l.name === 'veth-1g')!,
        image,
        dir,
      );
      if ('skipped' in link) {
        out.push({ case: 'compression', image: kind, skipped: link.skipped });
        continue;
      }
      const runs: Run[] = [];
      try {
        for (let r = 0; r < rounds; r++) {
          // Alternate which goes first, so neither always runs on a warmer machine.
          for (const packed of r % 2 ? [true, false] : [false, true]) {
            const run = await once(link.up.source.address, link.up.token, link.up.source.pid, packed);
            progress(
              `compression: ${kind} round ${r + 1} ${packed ? 'packed' : 'plain'}: ${run.wireBytes} bytes on the wire, full residency ${run.fullResidencyMs} ms`,
            );
            runs.push(run);
          }
        }
      } finally {
        await link.up.down();
      }
      out.push(summarize(kind, link.up.name, statSync(image).size, rounds, runs));
    }
  } finally {
    for (const c of children) c.kill('SIGKILL');
    removeScratchDir(dir);
  }
  return out;
}

function summarize(image: ImageKind, link: string, rawBytes: number, rounds: number, runs: Run[]): CompressionResult {
  const packed = runs.filter((r) => r.packed);
  const plain = runs.filter((r) => !r.packed);
  const r3 = (x: number) => Math.round(x * 1000) / 1000;
  const wire = packed.map((r) => r.wireBytes / rawBytes);
  const time = packed.map((r, k) => r.fullResidencyMs / plain[k].fullResidencyMs);
  const gib = rawBytes / 2 ** 30;
  const side = (rs: Run[]) => ({
    fullResidencyMs: median(rs.map((r) => r.fullResidencyMs)),
    sourceCpuMsPerGiB: round(median(rs.map((r) => r.sourceCpuMs)) / gib),
    destinationCpuMsPerGiB: round(median(rs.map((r) => r.destinationCpuMs)) / gib),
  });
  return {
    case: 'compression',
    image,
    link,
    rawBytes,
    rounds,
    wireBytesRatio: r3(median(wire)),
    plainWireBytesRatio: r3(median(plain.map((r) => r.wireBytes / rawBytes))),
    wireBytesRatioSpread: [r3(Math.min(...wire)), r3(Math.max(...wire))],
    timeRatio: r3(median(time)),
    timeRatioSpread: [r3(Math.min(...time)), r3(Math.max(...time))],
    packed: side(packed),
    plain: side(plain),
    runs,
  };
}

/** The results as a table for people. */
export function compressionTable(results: CompressionOutcome[]): string {
  const lines = [
    '| image | link | raw MiB | wire / raw: packed (spread) | not packed | full residency ms: packed / not (ratio) | CPU ms per GiB, source / destination: packed | not packed |',
    '|---|---|---|---|---|---|---|---|',
  ];
  for (const r of results) {
    if ('skipped' in r) {
      lines.push(`| ${r.image} | skipped: ${r.skipped} | | | | | | |`);
      continue;
    }
    lines.push(
      `| ${r.image} | ${r.link} | ${(r.rawBytes / 2 ** 20).toFixed(0)} | ${r.wireBytesRatio.toFixed(3)} (${r.wireBytesRatioSpread.join(' to ')}) | ${r.plainWireBytesRatio.toFixed(3)} | ${r.packed.fullResidencyMs} / ${r.plain.fullResidencyMs} (${r.timeRatio.toFixed(2)}x) | ${r.packed.sourceCpuMsPerGiB} / ${r.packed.destinationCpuMsPerGiB} | ${r.plain.sourceCpuMsPerGiB} / ${r.plain.destinationCpuMsPerGiB} |`,
    );
  }
  return lines.join('\n') + '\n';
}
