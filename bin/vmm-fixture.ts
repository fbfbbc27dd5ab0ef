// The VMM-like C program in test/fixtures/vmm.c, built on first use (the demo
// and the tests run it as "the VMM").
import { join } from 'node:path';
import { projectRoot } from '../lib/package-root.js';
import { compiledProgram } from '../lib/c-programs.js';

export function buildFixture(name: string): string {
  return compiledProgram(join(projectRoot(), 'test', 'fixtures', `${name}.c`), `fixture-${name}`);
}
