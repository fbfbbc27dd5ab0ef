// A VMM's guest must never hang on a dead source: the handler's session
// pauses and resumes by itself when the source is killed and restarted, and
// when told to give up it poisons what is missing (the guest gets SIGBUS).
import t from 'tap';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { VmmHandler, type VmmSessionSummary } from '../client/vmm-handler.js';
import type { RecoveryOptions } from '../client/session.js';
import { FAST_RECOVERY, buildFixture, cliCommand, randomImage, startServeCli, tempDir, until, writeImage } from './helpers.js';
import type { Test } from 'tap';
import { FaultProxy } from './fault-proxy.js';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { encodeFrame } from '../lib/protocol.js';

const FAST = FAST_RECOVERY;

async function handler(t: Test, dir: string, source: string, recovery: RecoveryOptions): Promise<{ handler: VmmHandler; socket: string }> {
  // Pure on demand, one page per fault: the VMM's touches outlive a kill for sure.
  const h = new VmmHandler({ source, recovery, background: { enabled: false }, window: { forward: 0, backward: 0 } });
  const socket = join(dir, 'handler.sock');
  await h.listen(socket);
  t.teardown(() => h.close());
  return { handler: h, socket };
}

function startVmm(t: Test, socket: string, imagePath: string, extra: string[] = []) {
  const child = spawn(buildFixture('vmm'), ['--socket', socket, '--image', imagePath, '--threads', '2', ...extra], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => {
    child.kill('SIGKILL');
  });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const closed = once(child, 'close').then(([code, signal]) => ({ code: code as number | null, signal: signal as string | null, out }));
  return { child, closed };
}

t.test('the source is killed (-9) mid-way and restarted: the VMM never notices more than a pause and verifies every byte', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(8192, 6));
  const source = `unix:${join(dir, 'src.sock')}`;
  const first = await startServeCli(t, ['--image', imagePath, '--listen', source]);
  const { handler: h, socket } = await handler(t, dir, source, FAST);
  const ended = once(h, 'session-end').then(([s]) => s as VmmSessionSummary);
  const vmm = startVmm(t, socket, imagePath, ['--order', 'random']);
  await once(h, 'session-start');
  first.child.kill('SIGKILL');
  await once(first.child, 'close');
  await startServeCli(t, ['--image', imagePath, '--listen', source]);
  const result = await vmm.closed;
  t.equal(result.signal, null);
  t.equal(result.code, 0, 'the VMM verified every byte');
  t.match(JSON.parse(result.out.trim().split('\n')[0]), { ok: true, mismatchedPages: 0 });
  const summary = await ended;
  t.ok(summary.recovery && summary.recovery.resumes >= 1, `the session resumed (${summary.recovery?.resumes}x)`);
  t.equal(summary.poisonedPages, 0);
});

t.test('with a give-up time, a source that never comes back poisons the missing pages: the guest gets SIGBUS, not a hang', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(8192));
  const source = `unix:${join(dir, 'src.sock')}`;
  const first = await startServeCli(t, ['--image', imagePath, '--listen', source]);
  const { handler: h, socket } = await handler(t, dir, source, { ...FAST, giveUpAfterMs: 300 });
  const ended = once(h, 'session-end').then(([s]) => s as VmmSessionSummary);
  const vmm = startVmm(t, socket, imagePath);
  await once(h, 'session-start');
  first.child.kill('SIGKILL');
  const result = await vmm.closed;
  t.equal(result.signal, 'SIGBUS', 'the guest touched a poisoned page');
  const summary = await ended;
  t.ok(summary.poisonedPages > 0, `${summary.poisonedPages} pages poisoned`);
  t.equal(summary.complete, false);
  t.equal(summary.recovery?.state, 'closed');
});

t.test('a source that cannot be reached at all: after the give-up time the VMM gets SIGBUS instead of hanging', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(256));
  const { socket } = await handler(t, dir, `unix:${join(dir, 'nobody-listens.sock')}`, { ...FAST, giveUpAfterMs: 300 });
  const vmm = startVmm(t, socket, imagePath);
  const result = await vmm.closed;
  t.equal(result.signal, 'SIGBUS');
});

/** Starts `postcopy handle` (a supervisor and its worker) with metrics; its JSON logs can be awaited. */
async function startHandleCli(t: Test, socket: string, source: string) {
  const [cmd, ...pre] = cliCommand();
  const args = ['handle', '--socket', socket, '--source', source, '--no-background', '--window', '0:0', '--silence-timeout', '500ms'];
  const handle = spawn(cmd, [...pre, ...args, '--metrics', 'tcp:127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const workers: number[] = [];
  t.teardown(() => {
    handle.kill('SIGTERM');
    for (const pid of workers) {
      try {
        process.kill(pid, 'SIGKILL'); // a worker left without its supervisor (the supervisor's SIGTERM stops the one it runs)
      } catch {
        // gone already
      }
    }
  });
  const logs: Record<string, unknown>[] = [];
  const waiters: { test: (l: Record<string, unknown>) => boolean; resolve: (l: Record<string, unknown>) => void }[] = [];
  const waitLog = (test: (l: Record<string, unknown>) => boolean) => {
    const seen = logs.find(test);
    return seen ? Promise.resolve(seen) : new Promise<Record<string, unknown>>((resolve) => waiters.push({ test, resolve }));
  };
  createInterface({ input: handle.stderr! }).on('line', (line) => {
    if (!line.startsWith('{')) return;
    const l = JSON.parse(line) as Record<string, unknown>;
    logs.push(l);
    if (l.msg === 'worker started') workers.push(l.workerPid as number);
    for (const w of [...waiters])
      if (w.test(l)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(l);
      }
  });
  const lines = createInterface({ input: handle.stdout! })[Symbol.asyncIterator]();
  t.same(JSON.parse((await lines.next()).value).listening, { kind: 'unix', path: socket });
  const metrics = JSON.parse((await lines.next()).value).metrics as string;
  const firstWorker = (await waitLog((l) => l.msg === 'worker started')).workerPid as number;
  /** Pages the worker installed on demand so far (a counter of its metrics, live sessions included). */
  const pagesOnDemand = async () => {
    const text = await fetch(metrics).then(
      (r) => r.text(),
      () => '',
    );
    return Number(/^postcopy_handler_pages_installed_total\{kind="on_demand"\} (\d+)/m.exec(text)?.[1] ?? 0);
  };
  return { handle, lines, waitLog, firstWorker, pagesOnDemand };
}

t.test('handle CLI: the worker is killed (-9) mid-way; the supervisor starts another, hands the VMM over, and the VMM verifies every byte', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(8192, 5));
  const source = `unix:${join(dir, 'src.sock')}`;
  await startServeCli(t, ['--image', imagePath, '--listen', source]);
  const socket = join(dir, 'handler.sock');
  const { lines, waitLog, firstWorker, pagesOnDemand } = await startHandleCli(t, socket, source);
  const vmm = startVmm(t, socket, imagePath, ['--order', 'random']);
  await waitLog((l) => l.msg === 'transfer started');
  // Killed once the guest holds pages the new worker must find (on a loaded machine the VMM may not have touched any yet at 'transfer started').
  await until('the first worker to install pages on demand', async () => (await pagesOnDemand()) > 0, 30_000, 5);
  process.kill(firstWorker, 'SIGKILL');
  await waitLog((l) => l.msg === 'worker started' && l.workerPid !== firstWorker);
  const tookOver = await waitLog((l) => l.msg === 'took over a VMM from a handler that died; its resident pages are kept');
  const result = await vmm.closed;
  t.equal(result.signal, null);
  t.equal(result.code, 0, 'the VMM verified every byte');
  t.ok((tookOver.residentPages as number) > 0, `the new worker kept ${tookOver.residentPages} resident pages`);
  const summary = JSON.parse((await lines.next()).value);
  t.equal(summary.complete, true, 'the new worker finished the session');
});

t.test('handle CLI: the supervisor is killed (-9) mid-way; its worker serves the VMM it holds to the end, then exits', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(8192, 5));
  const source = `unix:${join(dir, 'src.sock')}`;
  await startServeCli(t, ['--image', imagePath, '--listen', source]);
  const socket = join(dir, 'handler.sock');
  const { handle, waitLog, firstWorker, pagesOnDemand } = await startHandleCli(t, socket, source);
  const vmm = startVmm(t, socket, imagePath, ['--order', 'random']);
  await waitLog((l) => l.msg === 'transfer started');
  await until('the worker to install pages on demand', async () => (await pagesOnDemand()) > 0, 30_000, 5);
  handle.kill('SIGKILL');
  await waitLog((l) => l.msg === 'the supervisor is gone; the worker serves the VMMs it holds until each hangs up, then exits');
  const result = await vmm.closed;
  t.equal(result.signal, null);
  t.equal(result.code, 0, 'the VMM verified every byte');
  t.match(await waitLog((l) => l.msg === 'VMM session ended'), { complete: true, poisonedPages: 0 }, 'the worker finished the session');
  await waitLog((l) => l.msg === 'the supervisor is gone and no VMM is left; worker exiting');
  // Gone, or a zombie its new parent has not reaped yet.
  const exited = () => {
    try {
      return /\) Z /.test(readFileSync(`/proc/${firstWorker}/stat`, 'utf8'));
    } catch {
      return true;
    }
  };
  await until('the worker to exit', exited, 10_000);
  t.pass('the worker exited once its VMM was done');
});

/** A source on loopback TCP (plaintext, so byte offsets on its channels are known) behind a FaultProxy, and a handler through the proxy. */
async function handlerThroughProxy(t: Test, dir: string, imagePath: string, recovery: RecoveryOptions) {
  const token = 'cut during set-up';
  const server = new PageServer({ image: Image.open([{ path: imagePath }]), token, plaintextTcp: true });
  const where = await server.listen('tcp:127.0.0.1:0');
  const proxy = await FaultProxy.start(t, `tcp:127.0.0.1:${where.kind === 'tcp' ? where.port : 0}`);
  const h = new VmmHandler({
    source: proxy.address,
    token,
    acceptPlaintextTcp: true,
    recovery,
    background: { enabled: false },
    window: { forward: 0, backward: 0 },
  });
  const socket = join(dir, 'handler.sock');
  await h.listen(socket);
  t.teardown(async () => {
    await h.close();
    await server.close();
  });
  return { handler: h, socket, proxy, server };
}

/** The bytes of the `attached` frame that opens a data channel: a cut there falls between the channel's attach and the session's start. */
const ATTACHED_BYTES = encodeFrame({ t: 'attached' }).length;

t.test(
  'the urgent channel cut while the handler sets up a VMM\'s first connection: a pause and a resume, every VMM byte-exact (was: "handshake refused", the VMM hung)',
  async (t) => {
    const dir = tempDir(t);
    const imagePath = writeImage(dir, randomImage(2048, 6));
    const { handler: h, socket, proxy } = await handlerThroughProxy(t, dir, imagePath, FAST);
    const rejected: unknown[] = [];
    h.on('rejected', (r) => rejected.push(r));
    const cuts = [
      { direction: 'down', afterBytes: ATTACHED_BYTES, action: 'rst' },
      { direction: 'down', afterBytes: ATTACHED_BYTES, action: 'fin' },
      { direction: 'down', afterBytes: ATTACHED_BYTES + 1, action: 'rst' },
      { direction: 'up', afterBytes: 1, action: 'fin' },
      { direction: 'down', afterBytes: ATTACHED_BYTES, action: 'blackhole' },
      { direction: 'down', afterBytes: ATTACHED_BYTES + 40, action: 'rst' },
    ] as const;
    for (const [i, cut] of cuts.entries()) {
      // One VMM at a time: its control channel is the next connection the proxy accepts, its urgent channel the one after.
      proxy.inject({ connection: proxy.accepted + 1, ...cut });
      const ended = once(h, 'session-end').then(([s]) => s as VmmSessionSummary);
      const result = await startVmm(t, socket, imagePath, ['--order', 'random', '--seed', String(i + 1)]).closed;
      t.equal(result.code, 0, `VMM ${i + 1} (${cut.action} ${cut.direction} after ${cut.afterBytes} bytes): every byte verified`);
      t.equal((await ended).poisonedPages, 0, 'nothing poisoned');
    }
    t.equal(proxy.fired.length, cuts.length, 'every cut fired');
    t.same(rejected, [], 'no VMM was refused');
  },
);

t.test('the urgent channel cut during set-up and the source gone for good: after the give-up time the VMM gets SIGBUS, not a hang', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(2048, 6));
  const { socket, proxy } = await handlerThroughProxy(t, dir, imagePath, { ...FAST, giveUpAfterMs: 500 });
  proxy.inject({ connection: 1, direction: 'down', afterBytes: ATTACHED_BYTES, action: 'rst' });
  // Every later connection (each resume) is reset at its first byte: the source is out of reach from the cut on.
  for (let c = 3; c < 300; c++) proxy.inject({ connection: c, direction: 'down', afterBytes: 0, action: 'rst' });
  const result = await startVmm(t, socket, imagePath).closed;
  t.equal(result.signal, 'SIGBUS', 'the guest touched a poisoned page');
});
