// Where this package lives (its folder holding package.json), whether run from
// the sources or from dist/, what it says about itself, and how to run its CLI.
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The project root: the nearest folder above this file holding package.json. */
export function projectRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json')) && dirname(dir) !== dir) dir = dirname(dir);
  return dir;
}

/** package.json's version ('unknown' when it cannot be read). */
export function packageVersion(): string {
  try {
    return (JSON.parse(readFileSync(join(projectRoot(), 'package.json'), 'utf8')) as { version?: string }).version ?? 'unknown';
  } catch {
    return 'unknown';
  }
}

/**
 * argv that runs the package's CLI (`postcopy`, bin/postcopy) in a new process:
 * the same Node, with the same loader flags when run from the sources (bin/
 * beside lib/ in both layouts). For the bench's sources and the handler's workers.
 */
export function selfCommand(): string[] {
  const entry = fileURLToPath(new URL(`../bin/postcopy${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url));
  return [process.execPath, ...process.execArgv, entry];
}
