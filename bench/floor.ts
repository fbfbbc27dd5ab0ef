// The yardstick: bench/floor.c, this project's plain-C userfaultfd page
// service (no Node), built on first use and run in the same benchmark run so
// every figure comes with a ratio. $UFFD_FLOOR runs another program with the
// same arguments and output instead.
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, renameSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface FloorLatency {
  case: string;
  pages: number;
  p50_us: number;
  p90_us: number;
  p99_us: number;
  max_us: number;
  total_ms: number;
}
export interface FloorBulk {
  case: string;
  pages: number;
  gbytes_per_s: number;
  total_ms: number;
}

/** The project root: the nearest folder above this file holding package.json. */
export function projectRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json')) && dirname(dir) !== dir) dir = dirname(dir);
  return dir;
}

/** $UFFD_FLOOR, or bench/floor.c built (again when the source is newer) into the temp directory. */
export function floorCommand(): string {
  if (process.env.UFFD_FLOOR) return process.env.UFFD_FLOOR;
  const source = join(projectRoot(), 'bench', 'floor.c');
  const binary = join(tmpdir(), `uffd-postcopy-floor-${process.getuid?.() ?? 0}`);
  if (!existsSync(binary) || statSync(binary).mtimeMs < statSync(source).mtimeMs) {
    const partial = `${binary}.${process.pid}.tmp`;
    execFileSync('cc', ['-O2', '-Wall', '-pthread', '-o', partial, source]);
    renameSync(partial, binary);
  }
  return binary;
}

export function runFloor(pages: number, seed: number, cases: string[]): Promise<Map<string, FloorLatency | FloorBulk>> {
  const cmd = floorCommand();
  return new Promise((resolveRun, reject) => {
    execFile(cmd, ['--pages', String(pages), '--seed', String(seed), '--cases', cases.join(',')], { maxBuffer: 1 << 20 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`the floor failed: ${stderr || err.message}`));
      const out = new Map<string, FloorLatency | FloorBulk>();
      for (const line of stdout.split('\n'))
        if (line.trim()) {
          const r = JSON.parse(line);
          out.set(r.case, r);
        }
      resolveRun(out);
    });
  });
}
