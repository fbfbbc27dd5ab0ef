// postcopy demo: the README's main job. Makes an image (or takes --image),
// starts a real source page server in its own process, restores the image into
// this process while a workload thread faults pages in, and says what happened.
import { parseArgs } from 'node:util';
import { spawn } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { Destination } from '../client/destination.js';
import { punchHole, PAGE_SIZE } from '../lib/memory.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import type { Logger } from '../lib/logger.js';
import { formatReport } from './restore.js';
import { parseSize, selfCommand, startProgress } from './options.js';

export const demoUsage = `postcopy demo [--image FILE] [--size SIZE] [--touch FRACTION]

  Creates an image of SIZE (default 128M: random data, zero pages and a hole)
  unless --image is given, serves it from a separate source process with a
  token, restores it here while one thread touches FRACTION (default 0.25) of
  the pages in random order, and prints what happened.`;

/** Random data, every 4th page zero, and a 1/16 hole in the middle. */
function makeImage(path: string, bytes: number): void {
  const pages = Math.max(16, Math.floor(bytes / PAGE_SIZE));
  const fd = openSync(path, 'w', 0o600);
  try {
    const chunkPages = 2048;
    for (let first = 0; first < pages; first += chunkPages) {
      const n = Math.min(chunkPages, pages - first);
      const chunk = randomBytes(n * PAGE_SIZE);
      for (let p = 0; p < n; p++) if ((first + p) % 4 === 0) chunk.fill(0, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      writeSync(fd, chunk, 0, chunk.length, first * PAGE_SIZE);
    }
    const holePages = Math.floor(pages / 16);
    punchHole(fd, Math.floor(pages / 2) * PAGE_SIZE, holePages * PAGE_SIZE);
  } finally {
    closeSync(fd);
  }
}

export async function demo(argv: string[], log: Logger): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { image: { type: 'string' }, size: { type: 'string' }, touch: { type: 'string' } }, strict: true });
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-demo-'));
  const say = (line: string) => process.stdout.write(line + '\n');
  try {
    const imagePath = values.image ?? join(dir, 'image.bin');
    if (!values.image) makeImage(imagePath, parseSize(values.size ?? '128M', '--size'));
    const size = statSync(imagePath).size;
    const tokenPath = join(dir, 'token');
    const token = randomBytes(24).toString('base64url');
    writeFileSync(tokenPath, token, { mode: 0o600 });
    const socketPath = join(dir, 'source.sock');
    const [cmd, ...args] = selfCommand();
    const source = spawn(cmd, [...args, 'serve', '--image', imagePath, '--listen', `unix:${socketPath}`, '--token-file', tokenPath], {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, POSTCOPY_LOG_LEVEL: process.env.POSTCOPY_LOG_LEVEL ?? 'warn' },
    });
    try {
      await new Promise<void>((resolve, reject) => {
        const rl = createInterface({ input: source.stdout! });
        rl.once('line', () => { rl.close(); resolve(); });
        source.once('exit', (code) => reject(new Error(`the source exited (${code}) before listening`)));
      });
      say('uffd-postcopy demo');
      say(`  image        ${imagePath} (${(size / 2 ** 20).toFixed(1)} MiB)`);
      say(`  source       postcopy serve, pid ${source.pid}, on unix:${socketPath} (0600, token challenge-response)`);
      const dest = await Destination.connect({ source: `unix:${socketPath}`, token, logger: log });
      try {
        const region = dest.regions[0].mapping;
        const pages = region.length / PAGE_SIZE;
        const fraction = Math.min(1, Math.max(0, Number(values.touch ?? '0.25')));
        const order = shuffledOrder(pages, 1).subarray(0, Math.max(1, Math.floor(pages * fraction)));
        say(`  destination  an empty ${(region.length / 2 ** 20).toFixed(1)} MiB region registered with userfaultfd (missing faults)`);
        say(`  workload     one thread touching ${order.length} random pages while the background stream runs`);
        say(`  transfer     prefault window ${dest.transfer.window.forward}:${dest.transfer.window.backward}, background ${dest.transfer.background.enabled ? 'on' : 'off'}`);
        say('');
        const stopProgress = startProgress(() => dest.stats());
        const [report, touched] = await Promise.all([dest.finish(), touchPages(region.address, pages, order)]);
        stopProgress();
        process.stdout.write(formatReport(report));
        const sorted = Float64Array.from(touched.latencyNs).sort();
        say(`workload     ${order.length} touches in ${(touched.totalNs / 1e6).toFixed(1)} ms; as the workload saw them: p50 ${(sorted[sorted.length >> 1] / 1e3).toFixed(1)} µs, p99 ${(sorted[Math.floor(sorted.length * 0.99)] / 1e3).toFixed(1)} µs (a touch of a resident page costs nothing)`);
      } finally {
        dest.close();
      }
    } finally {
      source.kill('SIGTERM');
      await new Promise((r) => (source.exitCode !== null ? r(null) : source.once('exit', r)));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
