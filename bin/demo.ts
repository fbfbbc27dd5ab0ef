// postcopy demo: the README's main job. Makes an image (or takes --image),
// starts a real source page server in its own process, restores the image into
// this process while a workload thread faults pages in, and says what happened.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, mkdtempSync, openSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { VmmHandler, type VmmSessionSummary } from '../client/vmm-handler.js';
import type { InstalledCheck } from '../client/installed-checksum.js';
import { DEFAULT_TRANSFER } from '../lib/transfer.js';
import { buildFixture } from '../lib/c-programs.js';
import { punchHole, PAGE_SIZE } from '../lib/memory.js';
import type { Logger } from '../lib/logger.js';
import { formatReport } from './restore.js';
import { parseCommandLine, parseCount, parseSize, UsageError } from './options.js';
import { startSource, type RunningSource } from '../bench/source.js';
import { counted } from '../lib/words.js';

/** Random data, every 4th page zero, and a 1/16 hole in the middle. */
function makeImage(path: string, bytes: number): void {
  const pages = bytes / PAGE_SIZE;
  const fd = openSync(path, 'w', 0o600);
  try {
    const chunkPages = 2048;
    for (let first = 0; first < pages; first += chunkPages) {
      const n = Math.min(chunkPages, pages - first);
      const chunk = randomBytes(n * PAGE_SIZE);
      for (let p = 0; p < n; p++) if ((first + p) % 4 === 0) chunk.fill(0, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      writeSync(fd, chunk, 0, chunk.length, first * PAGE_SIZE);
    }
    punchHole(fd, Math.floor(pages / 2) * PAGE_SIZE, Math.floor(pages / 16) * PAGE_SIZE);
  } finally {
    closeSync(fd);
  }
}

export async function demo(argv: string[], log: Logger): Promise<void> {
  const values = parseCommandLine(argv, { image: { type: 'string' }, size: { type: 'string' }, threads: { type: 'string' } });
  const threads = parseCount(values.threads, '--threads', 4, 64, 1);
  if (values.image && values.size) throw new UsageError('--size makes a new image; it cannot go with --image');
  const size = parseSize(values.size ?? '128M', '--size', 1024 * PAGE_SIZE);
  if (size % PAGE_SIZE) throw new UsageError(`--size must be a whole number of ${PAGE_SIZE}-byte pages; not ${JSON.stringify(values.size)}`);
  if (values.image) {
    const stat = statSync(values.image, { throwIfNoEntry: false });
    if (!stat?.isFile()) throw new UsageError(`--image ${values.image}: not a file`);
    // The VMM maps guest memory in whole pages: an image that is not would make it exit before it starts.
    if (stat.size === 0 || stat.size % PAGE_SIZE)
      throw new UsageError(`--image ${values.image}: ${stat.size} bytes is not a whole number of ${PAGE_SIZE}-byte pages (guest memory is whole pages)`);
  }
  const dir = mkdtempSync(join(tmpdir(), 'postcopy-demo-'));
  const say = (line: string) => process.stdout.write(line + '\n');
  let source: RunningSource | null = null;
  let handler: VmmHandler | null = null;
  let child: ChildProcess | null = null;
  // SIGTERM/SIGINT: stop waiting, clean up below (the VMM, the handler, the source, the temp dir), then die of the signal.
  let interrupted: NodeJS.Signals | null = null;
  let interrupt: (signal: NodeJS.Signals) => void = () => {};
  const interruption = new Promise<never>((_, reject) => {
    interrupt = (signal) => {
      interrupted = signal;
      reject(new Error(`interrupted by ${signal}`));
    };
  });
  interruption.catch(() => {});
  const onSignal = (signal: NodeJS.Signals) => interrupt(signal);
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const unlessInterrupted = <T>(p: Promise<T>): Promise<T> => Promise.race([p, interruption]);
  try {
    const imagePath = values.image ?? join(dir, 'image.bin');
    if (!values.image) makeImage(imagePath, size);
    const imageSize = statSync(imagePath).size;
    const pages = imageSize / PAGE_SIZE;
    const tokenPath = join(dir, 'token');
    const token = randomBytes(24).toString('base64url');
    writeFileSync(tokenPath, token, { mode: 0o600 });
    const sourceSocket = join(dir, 'source.sock');
    const handlerSocket = join(dir, 'handler.sock');
    const vmm = buildFixture('vmm');
    source = await startSource(imagePath, `unix:${sourceSocket}`, { tokenFile: tokenPath }); // up, or exited, within moments
    if (interrupted) throw new Error(`interrupted by ${interrupted}`);
    handler = new VmmHandler({ source: `unix:${sourceSocket}`, token, logger: log });
    await handler.listen(handlerSocket);
    const balloonPages = Math.min(256, Math.floor(pages / 8));
    const balloonFrom = Math.floor(pages / 4) * PAGE_SIZE;

    say('uffd-postcopy demo');
    say(`  image        ${imagePath} (${(imageSize / 2 ** 20).toFixed(1)} MiB)`);
    say(`  source       postcopy serve, pid ${source.pid}, unix:${sourceSocket} (0600, token challenge-response)`);
    const { window, background } = DEFAULT_TRANSFER;
    say(
      `  handler      destination handler on unix:${handlerSocket}, prefault window ${window.forward}:${window.backward}, background ${background.enabled ? 'on' : 'off'}`,
    );
    const summaries: VmmSessionSummary[] = [];
    handler.on('session-end', (s: VmmSessionSummary) => summaries.push(s));
    const checked = once(handler, 'installed-check') as Promise<[InstalledCheck]>;
    child = spawn(
      vmm,
      [
        '--socket',
        handlerSocket,
        '--image',
        imagePath,
        '--threads',
        String(threads),
        '--order',
        'random',
        '--dontneed',
        `${balloonFrom}:${balloonPages * PAGE_SIZE}`,
        '--hold', // connected until we close its stdin, as a VMM stays: the handler checks every page first
      ],
      {
        stdio: ['pipe', 'pipe', 'inherit'],
      },
    );
    say(`  VMM          pid ${child.pid}: empty guest memory, userfaultfd handed over (Firecracker handshake),`);
    say(
      `               ${counted(threads, 'thread')} touch${threads === 1 ? 'es' : ''} every page in random order, then ${balloonPages} pages are given back (balloon)`,
    );
    say('');
    let out = '';
    child.stdout!.on('data', (d) => (out += d));
    // The VMM has checked its bytes (its line) and the handler the pages it installed; then the VMM may go.
    const exited = once(child, 'close') as Promise<[number | null, NodeJS.Signals | null]>;
    const [check] = await unlessInterrupted(Promise.race([checked, exited.then(() => [null] as const)]));
    child.stdin!.end();
    const [code, signal] = await unlessInterrupted(exited);
    // The handler sees the VMM's hang-up and ends its session; a VMM that exited before it was served has none.
    if (handler.activeSessions > 0) await unlessInterrupted(once(handler, 'released'));
    const summary = summaries[0];
    if (!summary) {
      say(`FAILED       the VMM exited (${signal ?? `code ${code}`}) before the handler served it${out.trim() ? `: ${out.trim()}` : ' (its error is above)'}`);
      process.exitCode = 1;
      return;
    }
    const vmmReport = JSON.parse(out.trim() || '{}');
    process.stdout.write(formatReport(summary));
    say(`balloon      ${summary.removedPages} pages given back; ${summary.zeroFilledAfterRemove} touched again and zero-filled without asking the source`);
    say(
      `checked      ${
        check?.result === 'match'
          ? `the handler checked all ${check.checkedPages} pages it installed against the source image: they match`
          : `the handler's check of the installed pages: ${check ? `${check.result}${check.unchecked ? ` (${check.unchecked})` : ''}` : 'not reached'}`
      }`,
    );
    say(
      `verified     ${code === 0 && vmmReport.ok ? `the VMM compared all ${vmmReport.pages} pages with the image: every byte matches` : `FAILED: ${out.trim() || `exit ${code}`}`}`,
    );
    say(`             (the VMM's threads spent ${vmmReport.touchMs} ms touching every page; the session ended when it exited)`);
    if (code !== 0 || check?.result === 'mismatch') process.exitCode = 1;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (child && child.exitCode === null && child.signalCode === null) {
      const gone = once(child, 'exit');
      child.kill('SIGKILL');
      await gone;
    }
    await handler?.close();
    await source?.close();
    rmSync(dir, { recursive: true, force: true });
    // Ended by the signal, as the shell expects (128 + its number), once everything is cleaned up.
    if (interrupted) process.exit(128 + osConstants.signals[interrupted]);
  }
}
