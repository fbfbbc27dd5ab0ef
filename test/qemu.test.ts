// QEMU snapshots from a real QEMU (Debian's qemu-system-x86, TCG): a
// machine held at its first instruction (-S) with a known pattern loaded into
// its RAM at 1 MiB (the generic loader device), saved with `postcopy qemu
// save` over QMP and with QEMU's own `migrate "exec:cat > FILE"` then
// `postcopy qemu import`. Real streams, real files; forged and cut streams
// refused with their codes.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Qmp } from '../lib/qmp.js';
import { cliCommand, runCli, spawnCli, tempDir, until } from './helpers.js';
import { freshBucket } from './store/env.js';
import type { Test } from 'tap';

const PATTERN_AT = 1 << 20;
const PATTERN_BYTES = 4 << 20;

const found = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
if (found.status !== 0) throw new Error('qemu-system-x86_64 is not installed: .ci/run installs it (apt-get install qemu-system-x86)');

/** A QEMU held before its first instruction (unless `held` is false: then it runs its firmware), with `pattern` in its RAM at 1 MiB; its QMP socket. */
async function startQemu(t: Test, dir: string, pattern: Buffer, held = true): Promise<{ qmp: string }> {
  const patternFile = join(dir, 'pattern.bin');
  writeFileSync(patternFile, pattern);
  const qmp = join(dir, 'qmp.sock');
  const child = spawn(
    'qemu-system-x86_64',
    [
      ...['-machine', 'pc', '-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', ...(held ? ['-S'] : [])],
      ...['-qmp', `unix:${qmp},server=on,wait=off`, '-device', `loader,file=${patternFile},addr=${PATTERN_AT}`],
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  t.teardown(() => void child.kill('SIGKILL'));
  for (let i = 0; i < 500 && !existsSync(qmp); i++) await new Promise((r) => setTimeout(r, 10));
  if (child.exitCode !== null) throw new Error(`qemu exited with ${child.exitCode}`);
  return { qmp };
}

/** QEMU migrates itself into FILE (its own `exec:cat`); resolves once it says completed. */
async function qemuSavesItself(qmpPath: string, file: string): Promise<void> {
  const qmp = await Qmp.connect(qmpPath);
  try {
    await qmp.execute('migrate', { uri: `exec:cat > ${file}` });
    await qmp.untilMigration(['completed'], 10_000);
  } finally {
    qmp.close();
  }
}

function checkSnapshot(t: Test, dir: string, pattern: Buffer) {
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8'));
  t.match(manifest, { format: 'uffd-postcopy-qemu-snapshot', machine: /^pc-i440fx-/, streamVersion: 3 });
  const ram = manifest.blocks.find((b: { name: string }) => b.name === 'pc.ram');
  t.equal(ram.length, 64 << 20, 'pc.ram: the guest RAM, 64 MiB');
  const image = readFileSync(join(dir, ram.file));
  t.ok(image.subarray(PATTERN_AT, PATTERN_AT + PATTERN_BYTES).equals(pattern), 'the pattern in the guest RAM is in the image, byte for byte');
  t.ok(image.subarray(0, PATTERN_AT).every((b) => b === 0) && image.subarray(PATTERN_AT + PATTERN_BYTES).every((b) => b === 0), 'and the rest is zeros');
  t.ok(statSync(join(dir, ram.file)).blocks * 512 < 2 * PATTERN_BYTES, 'zero pages are holes: the image file is sparse');
  t.ok(readFileSync(join(dir, manifest.files.devices)).length > 1000, 'the device state is kept');
  t.equal(readFileSync(join(dir, manifest.files.configuration))[0], 0x07, 'the configuration section, as QEMU sent it');
  t.match(JSON.parse(readFileSync(join(dir, manifest.files.vmDescription), 'utf8')), { devices: Array }, "QEMU's own description of the device state");
  return manifest;
}

t.test('postcopy qemu save: a running QEMU migrates into a snapshot directory', async (t) => {
  const dir = tempDir(t);
  const pattern = randomBytes(PATTERN_BYTES);
  const { qmp } = await startQemu(t, dir, pattern);
  const out = join(dir, 'snapshot');
  const r = await runCli(['qemu', 'save', '--qmp', qmp, '--out', out]);
  t.equal(r.code, 0, r.stderr);
  const printed = JSON.parse(r.stdout.trim().split('\n').pop()!);
  t.match(printed.qemuVersion, /^\d+\.\d+\.\d+$/, `QEMU ${printed.qemuVersion}`);
  checkSnapshot(t, out, pattern);
  const monitor = await Qmp.connect(qmp);
  t.match(await monitor.execute('query-status'), { status: 'postmigrate' }, 'QEMU is left paused, as after any migration');
  monitor.close();
});

t.test('postcopy qemu save stops a running guest for the save and leaves it paused; a save that fails leaves it running', async (t) => {
  const dir = tempDir(t);
  const { qmp } = await startQemu(t, dir, randomBytes(PATTERN_BYTES), false);
  // QEMU's monitor takes one client at a time: the test asks between the saves.
  const status = async () => {
    const monitor = await Qmp.connect(qmp);
    try {
      return await monitor.execute('query-status');
    } finally {
      monitor.close();
    }
  };
  t.match(await status(), { status: 'running' }, 'the guest runs');
  // An --out that cannot be written (a store's bucket that does not exist): the save fails once the guest is stopped and QEMU migrated.
  const missingBucket = `${await freshBucket(t)}-missing/qemu/vm`;
  const failed = await runCli(['qemu', 'save', '--qmp', qmp, '--out', missingBucket]);
  t.equal(failed.code, 1, 'the save fails');
  t.match(failed.stderr, /"msg":"the guest is stopped for the save"/, 'after stopping the guest');
  t.match(await status(), { status: 'running' }, 'and the guest runs again, as it was found');
  const r = await runCli(['qemu', 'save', '--qmp', qmp, '--out', join(dir, 'snapshot')]);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout.trim().split('\n').pop()!), { guest: 'paused', live: false }, 'saved stopped');
  t.match(await status(), { status: 'postmigrate' }, 'and left paused, as after any migration');
});

/** A guest holding a random pattern, saved by QEMU itself into DIR/vm.stream and imported into DIR/snapshot. */
async function importedSnapshot(t: Test, dir: string): Promise<{ pattern: Buffer; stream: string; snapshot: string }> {
  const pattern = randomBytes(PATTERN_BYTES);
  const { qmp } = await startQemu(t, dir, pattern);
  const stream = join(dir, 'vm.stream');
  await qemuSavesItself(qmp, stream);
  const snapshot = join(dir, 'snapshot');
  const r = await runCli(['qemu', 'import', stream, '--out', snapshot]);
  t.equal(r.code, 0, r.stderr);
  return { pattern, stream, snapshot };
}

t.test('postcopy qemu import: a stream QEMU saved itself (exec:cat)', async (t) => {
  const dir = tempDir(t);
  const { pattern, stream, snapshot: out } = await importedSnapshot(t, dir);
  const manifest = checkSnapshot(t, out, pattern);
  t.equal(manifest.qemuVersion, null, 'a file does not say which QEMU wrote it');
  t.equal(manifest.bytesRead, statSync(stream).size, 'every byte of the stream read');

  // The same stream cut short, forged, or not a stream at all: refused with its code, nothing hangs.
  const bytes = readFileSync(stream);
  const cases: [string, Buffer, string][] = [
    ['not a QEMU stream', randomBytes(4096), 'ERR_QEMU_STREAM_INVALID'],
    ['cut in its RAM', bytes.subarray(0, PATTERN_AT), 'ERR_QEMU_STREAM_TRUNCATED'],
    ['cut in its device state', bytes.subarray(0, bytes.length - 200), 'ERR_QEMU_STREAM_TRUNCATED'],
  ];
  // The first page of the pattern is a PAGE record continuing pc.ram: mark it XBZRLE instead.
  const record = Buffer.from([0, 0, 0, 0, 0, 0x10, 0, 0x28]);
  const at = bytes.indexOf(record);
  t.ok(at > 0, 'the pattern page is in the stream');
  const forged = Buffer.from(bytes);
  forged[at + 7] = 0x60;
  cases.push(['using xbzrle', forged, 'ERR_UNSUPPORTED']);
  for (const [what, content, code] of cases) {
    const file = join(dir, `bad-${code}-${cases.indexOf(cases.find((c) => c[0] === what)!)}.stream`);
    writeFileSync(file, content);
    const bad = await runCli(['qemu', 'import', file, '--out', join(dir, 'bad')]);
    t.equal(bad.code, 1, `${what}: refused`);
    t.match(bad.stderr, new RegExp(code), `${what}: ${code}`);
    if (what === 'using xbzrle') t.match(bad.stderr, /xbzrle/, 'naming the feature');
    t.notOk(existsSync(join(dir, 'bad')), `${what}: no half snapshot under --out`);
    t.same(
      readdirSync(dir).filter((f) => f.includes('partial')),
      [],
      'nor beside it',
    );
  }
});

t.test('postcopy qemu restore --wait owns its QEMU: interrupted, it stops QEMU and removes its directory; nothing is left running', async (t) => {
  const dir = tempDir(t);
  const { snapshot } = await importedSnapshot(t, dir);
  const zeros = join(dir, 'zeros.bin');
  writeFileSync(zeros, Buffer.alloc(PATTERN_BYTES));
  // A machine of another RAM size than the snapshot's: refused before QEMU starts, saying which size to give.
  const wrongSize = await runCli(['qemu', 'restore', '--snapshot', snapshot, '--', 'qemu-system-x86_64', '-machine', 'pc', '-accel', 'tcg', '-m', '128M']);
  t.equal(wrongSize.code, 2);
  t.match(wrongSize.stderr, /the snapshot's guest has 64M of RAM \(block pc\.ram\), the QEMU command asks -m 128M: give -m 64M.*ERR_USAGE/);
  const restore = spawnCli(t, [
    'qemu',
    'restore',
    '--snapshot',
    snapshot,
    '--wait',
    '--json',
    '--',
    'qemu-system-x86_64',
    ...['-machine', 'pc', '-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', '-device', `loader,file=${zeros},addr=${PATTERN_AT}`],
  ]);
  const report = await until('the guest is restored', () => restore.output().stdout.trim().split('\n')[0] || undefined, 60_000);
  const { pid, qmp: qmpPath } = JSON.parse(report) as { pid: number; qmp: string };
  t.ok(existsSync(qmpPath), "QEMU's monitor is there while it runs");
  restore.child.kill('SIGINT');
  const ended = await restore.exited;
  t.equal(ended.code, 130);
  t.match(ended.stderr, new RegExp(`interrupted \\(SIGINT\\): QEMU \\(pid ${pid}\\) was stopped and its directory .* removed`));
  await until('QEMU is gone', () => !existsSync(`/proc/${pid}`) || undefined, 10_000);
  t.notOk(existsSync(dirname(qmpPath)), 'its directory (monitor, log) is removed');
});

t.test('postcopy qemu import --out: a file, or a directory with something in it, is refused before the stream is read (exit 2)', async (t) => {
  const dir = tempDir(t);
  const stream = join(dir, 'vm.stream');
  writeFileSync(stream, randomBytes(4096));
  writeFileSync(join(dir, 'a-file'), 'x');
  mkdirSync(join(dir, 'full'));
  writeFileSync(join(dir, 'full', 'manifest.json'), '{}');
  for (const [out, message] of [
    [join(dir, 'a-file'), /--out .*a-file: is a file; a snapshot is a directory/],
    [join(dir, 'full'), /--out .*full: the directory is not empty/],
    [join(dir, 'no', 'such', 'dir'), /--out .*dir: the directory .*such does not exist/],
    [join(dir, 'a-file', 'snapshot'), /--out .*a-file\/snapshot: a part of the path is a file/],
  ] as const) {
    const r = await runCli(['qemu', 'import', stream, '--out', out]);
    t.equal(r.code, 2, `${out}: exit 2`);
    t.match(r.stderr, message);
    t.match(r.stderr, /ERR_USAGE/);
  }
  t.same(readdirSync(join(dir, 'full')), ['manifest.json'], 'nothing was mixed into the directory');
});

t.test('postcopy qemu save against a QMP socket nobody listens on: a clear error', async (t) => {
  const dir = tempDir(t);
  const r = await runCli(['qemu', 'save', '--qmp', join(dir, 'nobody.sock'), '--out', join(dir, 'out')]);
  t.equal(r.code, 1);
  t.match(r.stderr, /ERR_QMP_FAILED/);
});

/** A destination QEMU waiting for an incoming postcopy migration at `incoming` (the same machine, no pattern of its own). */
async function startDestination(t: Test, dir: string): Promise<{ qmp: string; incoming: string; child: ReturnType<typeof spawn> }> {
  const zeros = join(dir, 'zeros.bin');
  writeFileSync(zeros, Buffer.alloc(PATTERN_BYTES));
  const qmp = join(dir, 'dest-qmp.sock');
  const incoming = join(dir, 'incoming.sock');
  const child = spawn(
    'qemu-system-x86_64',
    [
      ...['-machine', 'pc', '-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none', '-S', '-incoming', 'defer'],
      ...['-qmp', `unix:${qmp},server=on,wait=off`, '-device', `loader,file=${zeros},addr=${PATTERN_AT}`],
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  t.teardown(() => void child.kill('SIGKILL'));
  for (let i = 0; i < 500 && !existsSync(qmp); i++) await new Promise((r) => setTimeout(r, 10));
  const monitor = await Qmp.connect(qmp);
  await monitor.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] });
  await monitor.execute('migrate-incoming', { uri: `unix:${incoming}` });
  monitor.close();
  for (let i = 0; i < 500 && !existsSync(incoming); i++) await new Promise((r) => setTimeout(r, 10));
  return { qmp, incoming, child };
}

/** Waits (bounded) until the destination QEMU says its migration is in postcopy: its guest's memory comes from us from now on. */
async function inPostcopy(qmpPath: string): Promise<void> {
  const monitor = await Qmp.connect(qmpPath);
  try {
    await monitor.untilMigration(['postcopy-active', 'completed'], 15_000);
  } finally {
    monitor.close();
  }
}

/** Reads 4 MiB of the destination's guest memory at 1 MiB through its monitor (each page it lacks faults and is fetched). */
async function guestPattern(qmpPath: string, dir: string): Promise<Buffer> {
  const monitor = await Qmp.connect(qmpPath);
  const file = join(dir, `read-${Date.now()}.bin`);
  await monitor.execute('pmemsave', { val: PATTERN_AT, size: PATTERN_BYTES, filename: file }, 30_000);
  monitor.close();
  return readFileSync(file);
}

async function snapshotOf(t: Test, dir: string, pattern: Buffer): Promise<string> {
  const { qmp } = await startQemu(t, dir, pattern);
  const out = join(dir, 'snapshot');
  const r = await runCli(['qemu', 'save', '--qmp', qmp, '--out', out]);
  if (r.code !== 0) throw new Error(r.stderr);
  return out;
}

t.test('postcopy qemu serve: a destination QEMU restores the snapshot in postcopy; its memory is the snapshot', async (t) => {
  const dir = tempDir(t);
  const pattern = randomBytes(PATTERN_BYTES);
  const snapshot = await snapshotOf(t, dir, pattern);
  const dest = await startDestination(t, dir);
  const served = await runCli(['qemu', 'serve', '--snapshot', snapshot, '--connect', `unix:${dest.incoming}`, '--json']);
  t.equal(served.code, 0, served.stderr);
  const report = JSON.parse(served.stdout.trim().split('\n').pop()!);
  t.match(report, { guestRunningMs: Number, fullResidencyMs: Number, bytesSent: Number }, 'what happened, as numbers');
  t.equal(report.pagesOnDemand + report.pagesWindow + report.pagesBackground, 16384 + 32 + 64 + 32 + 1 + 1, 'every page of every RAM block, once');
  const monitor = await Qmp.connect(dest.qmp);
  t.match(await monitor.execute('query-migrate'), { status: 'completed' }, 'the destination QEMU says the migration completed');
  monitor.close();
  t.ok((await guestPattern(dest.qmp, dir)).equals(pattern), "the destination's guest memory holds the pattern, byte for byte");
});

t.test('postcopy qemu serve --no-background: pages come only when the destination touches them', async (t) => {
  const dir = tempDir(t);
  const pattern = randomBytes(PATTERN_BYTES);
  const snapshot = await snapshotOf(t, dir, pattern);
  const dest = await startDestination(t, dir);
  const [cmd, ...pre] = cliCommand();
  const serve = spawn(cmd, [...pre, 'qemu', 'serve', '--snapshot', snapshot, '--connect', `unix:${dest.incoming}`, '--no-background', '--window', '0:0'], {
    stdio: 'ignore',
  });
  t.teardown(() => void serve.kill('SIGKILL'));
  await inPostcopy(dest.qmp);
  // Reading guest memory through the monitor faults on each page; each is asked for on the return path and sent.
  t.ok((await guestPattern(dest.qmp, dir)).equals(pattern), 'every page read arrived on demand, byte for byte');
  const monitor = await Qmp.connect(dest.qmp);
  t.match(await monitor.execute('query-migrate'), { status: 'postcopy-active' }, 'and the rest is still to come: the migration is still in postcopy');
  monitor.close();
});

t.test('a destination QEMU that dies mid-restore: serve exits with a clear error, nothing hangs', async (t) => {
  const dir = tempDir(t);
  const snapshot = await snapshotOf(t, dir, randomBytes(PATTERN_BYTES));
  const dest = await startDestination(t, dir);
  const [cmd, ...pre] = cliCommand();
  const serve = spawn(cmd, [...pre, 'qemu', 'serve', '--snapshot', snapshot, '--connect', `unix:${dest.incoming}`, '--no-background'], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  serve.stderr!.on('data', (d) => (stderr += d));
  const closed = once(serve, 'close');
  await inPostcopy(dest.qmp);
  dest.child.kill('SIGKILL');
  const [code] = await closed;
  t.equal(code, 1, 'serve exits with an error');
  t.match(stderr, /ERR_PEER_GONE/, 'saying the destination went away');
});

t.test('qemu restore from a store, its QEMU killed mid-restore: a clear error and an exit, never a hang on a page the store has not brought', async (t) => {
  const dir = tempDir(t);
  const { stream } = await importedSnapshot(t, dir);
  const stored = `${await freshBucket(t)}/qemu/vm`;
  const pushed = await runCli(['qemu', 'import', stream, '--out', stored]);
  t.equal(pushed.code, 0, pushed.stderr);
  // No background: pages come only as QEMU asks, so the restore is mid-way for as long as QEMU lives.
  const restore = spawnCli(t, [
    'qemu',
    'restore',
    '--snapshot',
    stored,
    '--no-background',
    '--cache-dir',
    join(dir, 'chunk-cache'),
    '--',
    'qemu-system-x86_64',
    ...['-machine', 'pc', '-accel', 'tcg', '-m', '64', '-nodefaults', '-display', 'none'],
  ]);
  await until('the guest runs', () => /its memory follows on demand/.test(restore.output().stderr) || undefined, 60_000);
  const qemuPid = await until('its QEMU', () => {
    const found = spawnSync('pgrep', ['-P', String(restore.child.pid), 'qemu-system'], { encoding: 'utf8' }).stdout.trim();
    return found ? Number(found.split('\n')[0]) : undefined;
  });
  process.kill(qemuPid, 'SIGKILL');
  const ended = await restore.exited;
  t.equal(ended.code, 1, 'the restore ends with an error');
  t.match(ended.stderr, /ERR_PEER_GONE/, 'saying QEMU went away');
});

/** A QEMU restored lazily from `snapshot` (postcopy qemu restore), its serial console in `serial`; killed at teardown. */
async function restoreGuest(t: Test, snapshot: string, command: string[], serial: string, what: string, options: string[] = []) {
  const restored = await runCli([
    'qemu',
    'restore',
    '--snapshot',
    snapshot,
    ...options,
    '--json',
    '--',
    'qemu-system-x86_64',
    ...command,
    '-serial',
    `file:${serial}`,
  ]);
  t.equal(restored.code, 0, `${what}: ${restored.stderr}`);
  const report = JSON.parse(restored.stdout.trim().split('\n').pop()!) as {
    qmp: string;
    pid: number;
    guestRunningMs: number;
    fullResidencyMs: number;
    fromStore?: { ramBytes: number; fetchedBytesWhenRunning: number; fetchedBytes: number };
  };
  t.teardown(() => {
    try {
      process.kill(report.pid, 'SIGKILL');
    } catch {
      /* gone */
    }
    rmSync(dirname(report.qmp), { recursive: true, force: true }); // restore leaves QEMU's monitor and log there while it runs
  });
  return report;
}

t.test('a guest writing its memory without pause, saved, then restored lazily into a new QEMU: it verifies all its memory and keeps running', async (t) => {
  const { testGuest, guestPasses: passes, guestKernelTrouble: trouble } = await import('./guest/build.js');
  const guest = testGuest();
  const dir = tempDir(t);
  const machine = ['-machine', 'pc', '-accel', 'tcg', '-cpu', 'qemu64', '-smp', '1', '-m', '192', '-nodefaults', '-display', 'none', '-no-reboot'];
  // 32 MiB checked each second, and an 8 MiB hot region rewritten 20,000 pages a second, a save included.
  const cmdline = 'console=ttyS0 panic=-1 quiet guest_mem_mib=32 guest_mem_hot_mib=8 guest_mem_rate=20000';
  const boot = ['-kernel', guest.kernel, '-initrd', guest.initrd, '-append', cmdline];
  const sourceSerial = join(dir, 'source.serial');
  const qmp = join(dir, 'source-qmp.sock');
  const source = spawn('qemu-system-x86_64', [...machine, ...boot, '-serial', `file:${sourceSerial}`, '-qmp', `unix:${qmp},server=on,wait=off`], {
    stdio: 'ignore',
  });
  t.teardown(() => void source.kill('SIGKILL'));
  // The guest boots (about 12 s under TCG), checks its memory and writes its hot region.
  await until('the guest to run and write', () => passes(sourceSerial).filter((p) => p.writes > 0).length >= 2, 90_000);

  // Saved with postcopy qemu save while it writes: stopped for the save, running again after it (--leave-running).
  const saved = join(dir, 'saved');
  const r = await runCli(['qemu', 'save', '--qmp', qmp, '--out', saved, '--leave-running']);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout.trim().split('\n').pop()!), { guest: 'running', live: false }, 'saved stopped, and left running as asked');
  const atSave = passes(sourceSerial);
  const monitor = await Qmp.connect(qmp);
  t.match(await monitor.execute('query-status'), { status: 'running' }, 'the source guest runs again');
  const goesOn = await until(
    'the source guest to go on writing and checking',
    () => {
      const p = passes(sourceSerial);
      return p.length >= atSave.length + 2 ? p : undefined;
    },
    90_000,
  );
  t.ok(
    goesOn.at(-1)!.writes > atSave.at(-1)!.writes,
    `the source guest goes on writing (${atSave.at(-1)!.writes} then ${goesOn.at(-1)!.writes} hot pages written)`,
  );
  // QEMU's own stream, for import: stopped first too (its live migration of this guest gives a snapshot that oopses when restored).
  await monitor.execute('stop');
  monitor.close();
  const stream = join(dir, 'vm.stream');
  await qemuSavesItself(qmp, stream);
  const imported = join(dir, 'imported');
  t.equal((await runCli(['qemu', 'import', stream, '--out', imported])).code, 0);
  t.ok(
    passes(sourceSerial).every((p) => p.errors === 0),
    'the source guest saw no error, before the save or after it',
  );
  t.same(trouble(sourceSerial), [], 'and its kernel reported no trouble');

  // The same stream into a snapshot store (a real Ceph RGW), sealed with a tenant's key, restored from there.
  const stored = `${await freshBucket(t)}/qemu/vm`;
  const tenantKey = join(dir, 'tenant.key');
  writeFileSync(tenantKey, 'a tenant secret of the qemu test\n');
  const pushed = await runCli(['qemu', 'import', stream, '--out', stored, '--tenant-key-file', tenantKey]);
  t.equal(pushed.code, 0, pushed.stderr);
  t.match(JSON.parse(pushed.stdout.trim().split('\n').pop()!), { snapshot: stored, pushed: { name: 'vm', uploadedChunks: Number } }, 'imported into the store');
  const keyless = await runCli(['qemu', 'restore', '--snapshot', stored, '--', 'qemu-system-x86_64', ...machine]);
  t.equal(keyless.code, 1, "without the tenant's key the sealed snapshot is refused, before QEMU starts");
  t.match(keyless.stderr, /ERR_STORE_DENIED/);
  t.match(keyless.stderr, /--tenant-key-file/);

  for (const [what, snapshot, options] of [
    ['saved with qemu save', saved, []],
    ["imported from QEMU's own file", imported, []],
    ['imported into a store', stored, ['--tenant-key-file', tenantKey, '--cache-dir', join(dir, 'chunk-cache')]],
  ] as const) {
    const serial = join(dir, `${what.replace(/\W+/g, '-')}.serial`);
    const report = await restoreGuest(t, snapshot, [...machine, ...boot], serial, what, [...options]);
    t.ok(
      report.guestRunningMs < report.fullResidencyMs,
      `${what}: the guest ran (${report.guestRunningMs} ms) before its memory had all arrived (${report.fullResidencyMs} ms)`,
    );
    if (snapshot === stored) {
      // From the store too, lazily: QEMU ran on its device state alone, before its RAM was fetched; the rest came after, all of it checked.
      const fromStore = report.fromStore!;
      t.ok(
        fromStore.fetchedBytesWhenRunning < fromStore.fetchedBytes / 2,
        `${what}: ${fromStore.fetchedBytesWhenRunning} of the ${fromStore.fetchedBytes} bytes its RAM took from the store were fetched when the guest ran`,
      );
    }
    const dest = await Qmp.connect(report.qmp);
    t.match(await dest.execute('query-migrate'), { status: 'completed' }, `${what}: the destination QEMU says the migration completed`);
    // The restored guest goes on where it was: its next passes check every page and it writes on.
    const after = await until(
      `${what}: passes after the restore`,
      () => {
        const p = passes(serial);
        return p.length >= 3 ? p : undefined;
      },
      90_000,
    );
    t.match(await dest.execute('query-status'), { status: 'running' }, `${what}: and the guest still runs`);
    dest.close();
    t.ok(
      after.every((p) => p.errors === 0),
      `${what}: every page checked, no error (passes ${after.map((p) => p.pass).join(', ')})`,
    );
    t.ok(after[0].pass > 1, `${what}: the guest kept running from where it was saved (pass ${after[0].pass})`);
    t.ok(after.at(-1)!.writes > after[0].writes, `${what}: and it writes on (${after[0].writes} then ${after.at(-1)!.writes} hot pages written)`);
    t.same(trouble(serial), [], `${what}: its kernel reported no trouble (no oops, no panic)`);
  }
});
