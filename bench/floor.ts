// The yardstick: bench/floor.c, this project's plain-C userfaultfd page
// service (no Node), built on first use and run in the same benchmark run so
// every figure comes with a ratio. $UFFD_FLOOR runs another program with the
// same arguments and output instead.
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { compiledProgram } from '../lib/c-programs.js';
import { projectRoot } from '../lib/package-root.js';

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

/** $UFFD_FLOOR, or bench/floor.c built (again when the source is newer) where only this user can write. */
export function floorCommand(): string {
  return process.env.UFFD_FLOOR || compiledProgram(join(projectRoot(), 'bench', 'floor.c'), 'floor');
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
