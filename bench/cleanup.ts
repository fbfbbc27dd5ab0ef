// What a benchmark leaves behind, taken away however it stops: its scratch
// directories (images, sockets, caches; often in /dev/shm, i.e. memory) and
// the processes it started (sources, handlers, restores, VMMs). The bench
// removes or stops each when it is done with it; whatever is left when the
// process exits goes then: a bench that failed, an uncaught error, or (while
// a scratch directory exists) SIGINT or SIGTERM, which then exit with 128 +
// the signal's number, as a shell reports a process the signal killed.
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { constants, tmpdir } from 'node:os';
import { join } from 'node:path';

const directories = new Set<string>();
const children = new Set<ChildProcess>();

function removeDirectories(): void {
  for (const dir of directories) removeScratchDir(dir);
}

function stopChildren(): void {
  for (const child of children) child.kill('SIGTERM');
}

// A signal's default action would skip the 'exit' hooks: exit through them instead.
function exitOnSignal(signal: NodeJS.Signals): void {
  process.exit(128 + constants.signals[signal]);
}

/**
 * A new directory `parent/PREFIX<pid>-XXXXXX` (the pid says whose it is),
 * removed by removeScratchDir, or as this process exits.
 */
export function scratchDir(prefix: string, parent = tmpdir()): string {
  const dir = mkdtempSync(join(parent, `${prefix}${process.pid}-`));
  // (No signal is handled between these lines: it waits for the event loop.)
  if (directories.size === 0) {
    process.once('exit', removeDirectories);
    process.on('SIGINT', exitOnSignal);
    process.on('SIGTERM', exitOnSignal);
  }
  directories.add(dir);
  return dir;
}

/** Removes a scratch directory and all it holds; once none is left, signals have their usual effect again. */
export function removeScratchDir(dir: string): void {
  // A child stopped a moment ago may still be writing there: retried while the directory fills.
  rmSync(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 20 });
  if (!directories.delete(dir) || directories.size > 0) return;
  process.off('exit', removeDirectories);
  process.off('SIGINT', exitOnSignal);
  process.off('SIGTERM', exitOnSignal);
}

/** `child`, sent SIGTERM if it still runs when this process exits. */
export function stopAtExit<C extends ChildProcess>(child: C): C {
  if (children.size === 0) process.once('exit', stopChildren);
  children.add(child);
  // 'close' comes after 'exit', and also when it never started (where 'exit' does not).
  child.once('close', () => {
    if (children.delete(child) && children.size === 0) process.off('exit', stopChildren);
  });
  return child;
}
