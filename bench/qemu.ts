// postcopy bench qemu: the test guest (test/guest: Debian's kernel, busybox,
// guest-mem checking its memory every second) booted under TCG, saved once
// by QEMU itself (`migrate "exec:cat > FILE"`) and imported from that stream
// (`postcopy qemu import`). Then, in one run, alternating:
//   ours  the snapshot served in postcopy (what `postcopy qemu restore`
//         does, in this process): the guest runs at once, its memory
//         follows on demand and in the background
//   qemu  QEMU's own restore of the same state (`migrate-incoming
//         "exec:cat FILE"`): the guest runs once every byte is in
// Each: from migrate-incoming to the guest running, and to completion.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Qmp, type QmpEvent } from '../lib/qmp.js';
import { QemuSnapshotSource } from '../server/qemu-source.js';
import { guestPasses as passes, testGuest } from '../test/guest/build.js';
import { interleaved, median, round } from './latency.js';
import { runCliJson } from './source.js';
import { removeScratchDir, scratchDir, stopAtExit } from './cleanup.js';

export interface QemuBenchResult {
  guestMemMib: number;
  rounds: number;
  /** Medians over the rounds, ms from migrate-incoming. */
  ours: { runningMs: number; completeMs: number; requests: number; requestLatencyUs: { p50: number; p99: number } };
  qemu: { runningMs: number; completeMs: number };
  /** ours / QEMU's, medians of the per-round ratios. */
  ratio: { running: number; complete: number };
  /**
   * QEMU-to-QEMU postcopy of the same guest, running (not from a snapshot):
   * `migrate` then `migrate-start-postcopy` at once, without and with the
   * postcopy-preempt channel; from `migrate` to the destination's guest
   * running and to completion, and the page requests QEMU counted. QEMU 7.2
   * reports no request latency.
   */
  qemuPostcopy: { preempt: boolean; runningMs: number; completeMs: number; requests: number }[];
  /** Every restored guest checked its memory after the restore and saw no error. */
  guestChecksClean: boolean;
}

const QEMU = 'qemu-system-x86_64';

async function waitFor<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  for (const end = Date.now() + timeoutMs; Date.now() < end;) {
    const v = await probe();
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

function qemu(args: string[]): ChildProcess {
  return stopAtExit(spawn(QEMU, args, { stdio: 'ignore' }));
}

/** Waits for the restored guest's next two passes (each checks every page) and says whether they were clean. */
async function guestClean(serial: string): Promise<boolean> {
  const p = await waitFor('the restored guest to check its memory', () => {
    const seen = passes(serial);
    return seen.length >= 2 ? seen : undefined;
  });
  return p.every((x) => x.errors === 0);
}

/** The QEMU command line of the test guest checking `guestMemMib` MiB: its machine, and its kernel and initrd. */
function guestCommand(guestMemMib: number): { machine: string[]; boot: string[] } {
  const guest = testGuest();
  return {
    machine: ['-machine', 'pc', '-accel', 'tcg', '-cpu', 'qemu64', '-m', String(guestMemMib * 2 + 128), '-nodefaults', '-display', 'none', '-no-reboot'],
    boot: ['-kernel', guest.kernel, '-initrd', guest.initrd, '-append', `console=ttyS0 panic=-1 quiet guest_mem_mib=${guestMemMib}`],
  };
}

/**
 * Boots the test guest under TCG in `dir`, waits for it to check its memory
 * twice, stops it and has QEMU save it (`migrate "exec:cat > FILE"`), then
 * imports that stream (`postcopy qemu import`). The stream's and the
 * snapshot's paths, and the saved QEMU's QMP socket (it stays, stopped: the
 * caller may run it again); that QEMU is in `children` (the caller stops it).
 */
export async function savedTestGuest(
  dir: string,
  guestMemMib: number,
  children: ChildProcess[],
  progress: (line: string) => void,
): Promise<{ stream: string; snapshot: string; qmpPath: string }> {
  const { machine, boot } = guestCommand(guestMemMib);
  progress(`qemu: booting the test guest (${guestMemMib} MiB checked every second)`);
  const qmpPath = join(dir, 'source-qmp.sock');
  const serial = join(dir, 'source.serial');
  children.push(qemu([...machine, ...boot, '-serial', `file:${serial}`, '-qmp', `unix:${qmpPath},server=on,wait=off`]));
  await waitFor('the guest to boot', () => (passes(serial).length >= 2 ? true : undefined), 180_000);
  // QEMU saves the guest itself; the snapshot is imported from that very stream: both restores start from one state.
  const stream = join(dir, 'vm.stream');
  const source = await Qmp.connect(qmpPath);
  // Stopped first: a live migration of this guest (it writes its memory) gives a stream that oopses when restored under TCG.
  await source.execute('stop');
  await source.execute('migrate', { uri: `exec:cat > ${stream}` });
  await source.untilMigration(['completed'], 120_000, 20);
  source.close();
  const snapshot = join(dir, 'snapshot');
  await runCliJson(['qemu', 'import', stream, '--out', snapshot]);
  return { stream, snapshot, qmpPath };
}

/**
 * The test guest saved twice: as savedTestGuest, then run on for two more of
 * its passes (each rewrites a 64th of its pages, and its hot region is
 * rewritten without pause) and saved and imported again. The two snapshots'
 * directories, oldest first; the guest's QEMU is in `children`.
 */
export async function guestSavedTwice(dir: string, guestMemMib: number, children: ChildProcess[], progress: (line: string) => void): Promise<[string, string]> {
  const first = await savedTestGuest(dir, guestMemMib, children, progress);
  const serial = join(dir, 'source.serial');
  const stream = join(dir, 'vm-2.stream');
  const qmp = await Qmp.connect(first.qmpPath);
  try {
    const seen = passes(serial).length;
    await qmp.execute('cont');
    progress('qemu: the guest runs on for two passes, then is saved again');
    await waitFor('the guest to run two more passes', () => (passes(serial).length >= seen + 2 ? true : undefined));
    await qmp.execute('stop');
    await qmp.execute('migrate', { uri: `exec:cat > ${stream}` });
    await qmp.untilMigration(['completed'], 120_000, 20);
  } finally {
    qmp.close();
  }
  const snapshot = join(dir, 'snapshot-2');
  await runCliJson(['qemu', 'import', stream, '--out', snapshot]);
  return [first.snapshot, snapshot];
}

export async function qemuBench(guestMemMib: number, rounds: number, progress: (line: string) => void): Promise<QemuBenchResult> {
  const dir = scratchDir('uffd-postcopy-bench-qemu-');
  const { machine, boot } = guestCommand(guestMemMib);
  const children: ChildProcess[] = [];
  try {
    const { stream, snapshot, qmpPath } = await savedTestGuest(dir, guestMemMib, children, progress);
    let clean = true;
    let n = 0;
    let m = 0;
    const { a, b } = await interleaved(
      rounds,
      async () => {
        progress(`qemu: round ${++n}: postcopy qemu restore`);
        const out = join(dir, `ours-${n}.serial`);
        const qmp = join(dir, `ours-${n}.sock`);
        const incoming = join(dir, `incoming-${n}.sock`);
        const child = qemu([...machine, ...boot, '-serial', `file:${out}`, '-incoming', 'defer', '-qmp', `unix:${qmp},server=on,wait=off`]);
        children.push(child);
        // As `qemu restore` does: the snapshot is opened while QEMU starts.
        const source = new QemuSnapshotSource(snapshot);
        let dest: Qmp;
        let report: Awaited<ReturnType<QemuSnapshotSource['serve']>>;
        let started: number;
        let resumed: Promise<QmpEvent>;
        try {
          await waitFor('QEMU to start', () => (existsSync(qmp) ? true : undefined));
          dest = await Qmp.connect(qmp);
          await dest.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] });
          // The guest runs when QEMU says so (its RESUME event), watched the same way in every case.
          resumed = dest.nextEvent('RESUME', 120_000);
          resumed.catch(() => {}); // awaited below; a failure before that is the one reported
          started = performance.now();
          await dest.execute('migrate-incoming', { uri: `unix:${incoming}` });
          await waitFor('QEMU to listen', () => (existsSync(incoming) ? true : undefined));
          report = await source.serve(`unix:${incoming}`);
        } finally {
          source.close();
        }
        const completeMs = performance.now() - started;
        const runningMs = (await resumed).at - started;
        dest.close();
        clean &&= await guestClean(out);
        child.kill('SIGKILL');
        return { ...report, runningMs, completeMs };
      },
      async () => {
        progress(`qemu: round ${++m}: QEMU's own restore (exec:cat)`);
        const out = join(dir, `qemu-${m}.serial`);
        const qmp = join(dir, `dest-${m}.sock`);
        const started = performance.now();
        const child = qemu([...machine, ...boot, '-serial', `file:${out}`, '-incoming', 'defer', '-qmp', `unix:${qmp},server=on,wait=off`]);
        children.push(child);
        await waitFor('QEMU to start', () => (existsSync(qmp) ? true : undefined));
        const dest = await Qmp.connect(qmp);
        await dest.execute('migrate-incoming', { uri: `exec:cat ${stream}` });
        // The stream is of a stopped guest: QEMU loads it and stays paused, as our restore would be told to run it.
        await dest.untilMigration(['completed'], 120_000, 20);
        const resumed = dest.nextEvent('RESUME', 120_000);
        resumed.catch(() => {}); // awaited below; a failure before that is the one reported
        await dest.execute('cont');
        const runningMs = (await resumed).at - started;
        dest.close();
        clean &&= await guestClean(out);
        child.kill('SIGKILL');
        return { runningMs, completeMs: runningMs };
      },
    );
    // QEMU to QEMU, in postcopy from the start, the source running again each time.
    const qemuPostcopy: QemuBenchResult['qemuPostcopy'] = [];
    for (const preempt of [false, true]) {
      const runs: { runningMs: number; completeMs: number; requests: number }[] = [];
      for (let i = 0; i < rounds; i++) {
        progress(`qemu: round ${i + 1}: QEMU to QEMU postcopy${preempt ? ' with preempt' : ''}`);
        const out = join(dir, `q2q-${preempt}-${i}.serial`);
        const qmp = join(dir, `q2q-${preempt}-${i}.sock`);
        const incoming = join(dir, `q2q-in-${preempt}-${i}.sock`);
        const child = qemu([...machine, ...boot, '-serial', `file:${out}`, '-incoming', 'defer', '-qmp', `unix:${qmp},server=on,wait=off`]);
        children.push(child);
        await waitFor('QEMU to start', () => (existsSync(qmp) ? true : undefined));
        const caps = { capabilities: [{ capability: 'postcopy-ram', state: true }, ...(preempt ? [{ capability: 'postcopy-preempt', state: true }] : [])] };
        const dest = await Qmp.connect(qmp);
        await dest.execute('migrate-set-capabilities', caps);
        await dest.execute('migrate-incoming', { uri: `unix:${incoming}` });
        await waitFor('QEMU to listen', () => (existsSync(incoming) ? true : undefined));
        const src = await Qmp.connect(qmpPath);
        await src.execute('cont');
        await src.execute('migrate-set-capabilities', caps);
        const resumed = dest.nextEvent('RESUME', 120_000);
        resumed.catch(() => {}); // awaited below; a failure before that is the one reported
        const started = performance.now();
        await src.execute('migrate', { uri: `unix:${incoming}` });
        await src.execute('migrate-start-postcopy');
        const q = await src.untilMigration<{ status: string; ram?: { 'postcopy-requests'?: number } }>(['completed'], 120_000, 20);
        runs.push({ runningMs: (await resumed).at - started, completeMs: performance.now() - started, requests: q.ram?.['postcopy-requests'] ?? 0 });
        src.close();
        dest.close();
        clean &&= await guestClean(out);
        child.kill('SIGKILL');
      }
      qemuPostcopy.push({
        preempt,
        runningMs: round(median(runs.map((r) => r.runningMs)), 1),
        completeMs: round(median(runs.map((r) => r.completeMs)), 1),
        requests: round(median(runs.map((r) => r.requests)), 1),
      });
    }
    const med = (xs: number[]) => round(median(xs), 1);
    return {
      guestMemMib,
      rounds,
      ours: {
        runningMs: med(a.map((r) => r.runningMs)),
        completeMs: med(a.map((r) => r.completeMs)),
        requests: med(a.map((r) => r.requests)),
        requestLatencyUs: { p50: med(a.map((r) => r.requestLatencyUs.p50)), p99: med(a.map((r) => r.requestLatencyUs.p99)) },
      },
      qemu: { runningMs: med(b.map((r) => r.runningMs)), completeMs: med(b.map((r) => r.completeMs)) },
      ratio: {
        running: round(median(a.map((r, i) => r.runningMs / b[i].runningMs)), 3),
        complete: round(median(a.map((r, i) => r.completeMs / b[i].completeMs)), 3),
      },
      qemuPostcopy,
      guestChecksClean: clean,
    };
  } finally {
    for (const c of children) c.kill('SIGKILL');
    removeScratchDir(dir);
  }
}

/** The QEMU bench as a table: our lazy restore beside QEMU's own, and QEMU-to-QEMU postcopy beside them. */
export function qemuTable([result]: QemuBenchResult[]): string {
  return [
    '| restore | guest running | complete | page requests | request latency p50 / p99 |',
    '| --- | --- | --- | --- | --- |',
    `| postcopy qemu restore | ${result.ours.runningMs} ms | ${result.ours.completeMs} ms | ${result.ours.requests} | ${result.ours.requestLatencyUs.p50} / ${result.ours.requestLatencyUs.p99} µs |`,
    `| QEMU's own (exec:cat) | ${result.qemu.runningMs} ms | ${result.qemu.completeMs} ms | | |`,
    `| ratio (ours / QEMU's) | ${result.ratio.running} | ${result.ratio.complete} | | |`,
    ...result.qemuPostcopy.map(
      (q) =>
        `| QEMU to QEMU postcopy${q.preempt ? ' + preempt' : ''} (live) | ${q.runningMs} ms | ${q.completeMs} ms | ${q.requests} | (not reported by QEMU) |`,
    ),
    '',
  ].join('\n');
}
