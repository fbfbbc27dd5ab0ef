// The test guest, built on demand from Debian packages: the kernel of
// linux-image-amd64, busybox-static, and test/guest/guest-mem.c compiled
// statically, in an initramfs whose /init mounts /proc and /dev and runs
// guest-mem. Downloaded with `apt-get download` and unpacked with `dpkg-deb
// -x` (nothing is installed on the host); cached in this user's private
// directory and rebuilt when guest-mem.c changes.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { projectRoot } from '../../lib/package-root.js';

export interface TestGuest {
  kernel: string;
  initrd: string;
}

/** The kernel and initramfs of the test guest (built on first use). */
export function testGuest(): TestGuest {
  const dir = join(tmpdir(), `uffd-postcopy-${process.getuid?.() ?? 0}`, 'guest');
  const source = join(projectRoot(), 'test', 'guest', 'guest-mem.c');
  const kernel = join(dir, 'vmlinuz');
  const initrd = join(dir, 'initramfs.cpio');
  if (existsSync(kernel) && existsSync(initrd) && statSync(initrd).mtimeMs >= statSync(source).mtimeMs) return { kernel, initrd };
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const work = join(dir, 'work');
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work);
  // linux-image-amd64 is a metapackage: the kernel itself is the one it depends on.
  const depends = execFileSync('apt-cache', ['depends', 'linux-image-amd64'], { encoding: 'utf8' });
  const image = /Depends: (linux-image-[0-9][^\s]*)/.exec(depends)?.[1];
  if (!image) throw new Error('apt-cache names no kernel for linux-image-amd64 (run apt-get update)');
  execFileSync('apt-get', ['download', '-qq', image, 'busybox-static'], { cwd: work, stdio: ['ignore', 'ignore', 'inherit'] });
  for (const deb of readdirSync(work).filter((f) => f.endsWith('.deb'))) execFileSync('dpkg-deb', ['-x', join(work, deb), join(work, 'root')]);
  const boot = join(work, 'root', 'boot');
  const vmlinuz = readdirSync(boot).find((f) => f.startsWith('vmlinuz-'));
  if (!vmlinuz) throw new Error(`${image} holds no vmlinuz`);
  writeFileSync(kernel, readFileSync(join(boot, vmlinuz)));
  const guestMem = join(work, 'guest-mem');
  execFileSync('cc', ['-O2', '-static', '-o', guestMem, source]);
  const init = ['#!/bin/busybox sh', '/bin/busybox mount -t proc proc /proc', '/bin/busybox mount -t devtmpfs dev /dev', 'exec /guest-mem', ''].join('\n');
  writeFileSync(
    initrd,
    cpio([
      { name: 'bin', mode: 0o40755 },
      { name: 'proc', mode: 0o40755 },
      { name: 'dev', mode: 0o40755 },
      { name: 'dev/console', mode: 0o20600, rdev: [5, 1] },
      { name: 'bin/busybox', mode: 0o100755, data: readFileSync(join(work, 'root', 'bin', 'busybox')) },
      { name: 'init', mode: 0o100755, data: Buffer.from(init) },
      { name: 'guest-mem', mode: 0o100755, data: readFileSync(guestMem) },
    ]),
  );
  rmSync(work, { recursive: true, force: true });
  return { kernel, initrd };
}

/**
 * What the guest printed on its serial console (a file): each guest-mem pass, with the errors it found and its hot-region writes so far.
 * Only whole lines: QEMU may be writing the last one as it is read (a line cut before " writes N" read as 0 writes).
 */
export function guestPasses(serialFile: string): { pass: number; errors: number; writes: number }[] {
  return [...serialText(serialFile).matchAll(/guest-mem: pass (\d+) pages \d+ errors (\d+)(?: writes (\d+))?\r?\n/g)].map((m) => ({
    pass: Number(m[1]),
    errors: Number(m[2]),
    writes: Number(m[3] ?? 0),
  }));
}

/** The lines of the serial console where the guest's kernel reports an oops, a BUG, a panic or a fault it did not expect. */
export function guestKernelTrouble(serialFile: string): string[] {
  return serialText(serialFile)
    .split('\n')
    .filter((line) => /Oops|BUG:|Kernel panic|general protection|stack-protector|Call Trace|segfault/.test(line));
}

function serialText(serialFile: string): string {
  try {
    return readFileSync(serialFile, 'utf8');
  } catch {
    return '';
  }
}

interface Entry {
  name: string;
  mode: number;
  data?: Buffer;
  rdev?: [number, number];
}

/** An initramfs archive: cpio "newc" (ASCII headers, 4-byte alignment), ending with TRAILER!!!. */
function cpio(entries: Entry[]): Buffer {
  const parts: Buffer[] = [];
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  const hex = (v: number) => v.toString(16).padStart(8, '0');
  let ino = 1;
  for (const e of [...entries, { name: 'TRAILER!!!', mode: 0 } as Entry]) {
    const data = e.data ?? Buffer.alloc(0);
    const name = Buffer.from(e.name + '\0');
    const header = '070701' + [ino++, e.mode, 0, 0, 1, 0, data.length, 0, 0, e.rdev?.[0] ?? 0, e.rdev?.[1] ?? 0, name.length, 0].map(hex).join('');
    parts.push(Buffer.from(header), name, pad(110 + name.length), data, pad(data.length));
  }
  return Buffer.concat(parts);
}
