// Shared test plumbing: temp dirs, images with known content, the C fixture,
// and a tiny fault-serving loop for tests that resolve faults from JS.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import type { Test } from 'tap';
import type { Userfaultfd } from '../lib/uffd.js';

export const here = dirname(fileURLToPath(import.meta.url));

// The default token file a TCP `serve` creates and `restore` finds: one per
// test process, in the temp dir, never the user's own.
process.env.POSTCOPY_TOKEN_FILE ??= join(tmpdir(), `uffd-postcopy-token-${process.pid}`);
process.once('exit', () => rmSync(process.env.POSTCOPY_TOKEN_FILE!, { force: true }));
export const PAGE = 4096;

export function tempDir(t: Test, prefix = 'uffd-postcopy-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** An image of `pages` pages of random bytes, every `zeroEvery`-th page all zero. */
export function randomImage(pages: number, zeroEvery = 0): Buffer {
  const image = randomBytes(pages * PAGE);
  if (zeroEvery > 0) for (let p = 0; p < pages; p += zeroEvery) image.fill(0, p * PAGE, (p + 1) * PAGE);
  return image;
}

export function writeImage(dir: string, image: Buffer, name = 'image.bin'): string {
  const path = join(dir, name);
  writeFileSync(path, image);
  return path;
}

export { buildFixture } from '../bin/vmm-fixture.js';

/**
 * Serves missing faults of [base, base+image.length) from `image` until `done`
 * settles; returns how many faults it resolved.
 */
export async function serveFaultsFromJs(uffd: Userfaultfd, base: number, image: Buffer, done: Promise<unknown>): Promise<number> {
  let finished = false;
  void done.finally(() => (finished = true)).catch(() => {});
  let faults = 0;
  while (!finished) {
    if (!(await uffd.waitReadable(20))) continue;
    for (const ev of uffd.readEvents()) {
      if (ev.type !== 'pagefault') continue;
      const page = Math.floor((ev.address - base) / PAGE);
      const r = uffd.copy(base + page * PAGE, image, { sourceOffset: page * PAGE, length: PAGE });
      if (r.code !== null && r.code !== 'EEXIST') throw new Error(`copy stopped with ${r.code}`);
      faults++;
    }
  }
  return faults;
}

/** argv that runs the CLI from sources, with the same TypeScript loader as this test. */
export function cliCommand(): string[] {
  return [process.execPath, ...process.execArgv, join(here, '..', 'bin', 'postcopy.ts')];
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `postcopy ...args` to completion. */
export function runCli(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  const [cmd, ...pre] = cliCommand();
  const child = spawn(cmd, [...pre, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
}

/** Starts `postcopy serve` and resolves once it listens; killed at teardown. */
export async function startServeCli(t: Test, args: string[]): Promise<{ child: ChildProcess; listening: { kind: string; path?: string; port?: number }; tokenFile?: string }> {
  const [cmd, ...pre] = cliCommand();
  const child = spawn(cmd, [...pre, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => { child.kill('SIGTERM'); });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const line = await new Promise<string>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d) => {
      out += d;
      const nl = out.indexOf('\n');
      if (nl >= 0) resolve(out.slice(0, nl));
    });
    child.once('exit', (code) => reject(new Error(`serve exited with ${code}: ${stderr}`)));
  });
  const { listening, tokenFile } = JSON.parse(line);
  return { child, listening, tokenFile };
}
