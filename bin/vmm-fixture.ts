// The VMM-like C program in test/fixtures/vmm.c, built on first use with the
// machine's C compiler (the demo and the tests run it as "the VMM").
import { execFileSync } from 'node:child_process';
import { existsSync, renameSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { projectRoot } from '../bench/floor.js';

export function buildFixture(name: string): string {
  const source = join(projectRoot(), 'test', 'fixtures', `${name}.c`);
  const binary = join(tmpdir(), `uffd-postcopy-fixture-${name}-${process.getuid?.() ?? 0}`);
  if (!existsSync(binary) || statSync(binary).mtimeMs < statSync(source).mtimeMs) {
    const partial = `${binary}.${process.pid}.tmp`;
    execFileSync('cc', ['-O2', '-Wall', '-pthread', '-o', partial, source]);
    renameSync(partial, binary);
  }
  return binary;
}
