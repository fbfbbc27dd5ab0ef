// The project's small C programs (the VMM fixture, the benchmark floor),
// compiled on first use with the machine's C compiler into a directory only
// this user can write. A build is named by its source's content hash, so
// checkouts with different sources (or a source changed since) never run one
// another's build.
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, lstatSync, mkdirSync, readFileSync, renameSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ErrorCode, PostcopyError } from './errors.js';
import { projectRoot } from './package-root.js';

/** <tmp>/uffd-postcopy-<uid>, mode 0700: refused when someone else owns it or others can write to it. */
function privateDir(): string {
  const uid = process.getuid?.() ?? 0;
  const dir = join(tmpdir(), `uffd-postcopy-${uid}`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  if (!st.isDirectory() || st.uid !== uid || st.mode & 0o022) {
    throw new PostcopyError(ErrorCode.INVALID_ARG_VALUE, `${dir} is not a directory of this user's that only it can write; remove it`);
  }
  chmodSync(dir, 0o700);
  return dir;
}

/** The path of `source` compiled (with -O2 -pthread), built now unless this very source was built before. */
export function compiledProgram(source: string, name: string): string {
  const hash = createHash('sha256').update(readFileSync(source)).digest('hex').slice(0, 16);
  const binary = join(privateDir(), `${name}-${hash}`);
  if (!existsSync(binary)) {
    const partial = `${binary}.${process.pid}.tmp`;
    execFileSync('cc', ['-O2', '-Wall', '-pthread', '-o', partial, source]);
    renameSync(partial, binary);
  }
  return binary;
}

/** The VMM-like C program test/fixtures/<name>.c (the demo, the bench and the tests run it as "the VMM"), built on first use. */
export function buildFixture(name: string): string {
  return compiledProgram(join(projectRoot(), 'test', 'fixtures', `${name}.c`), `fixture-${name}`);
}
