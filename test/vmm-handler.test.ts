import t from 'tap';
import { pino } from 'pino';
import { spawn } from 'node:child_process';
import { closeSync, ftruncateSync, openSync, readdirSync, readlinkSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import { join } from 'node:path';
import { once } from 'node:events';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { MAX_PENDING_HANDSHAKES, VmmHandler, type VmmSessionSummary } from '../client/vmm-handler.js';
import type { InstalledCheck } from '../client/installed-checksum.js';
import { FaultProxy } from './fault-proxy.js';
import { sendFds } from '../lib/fd-passing.js';
import { memfdCreate } from '../lib/memory.js';
import { Userfaultfd } from '../lib/uffd.js';
import { PAGE, buildFixture, randomImage, tempDir, writeImage, until } from './helpers.js';
import type { Test } from 'tap';

interface Setup {
  dir: string;
  imagePath: string;
  image: Buffer;
  handler: VmmHandler;
  handlerSocket: string;
  server: PageServer;
}

async function setup(t: Test, transport: 'unix' | 'tcp' = 'unix', pages = 2048, background = true): Promise<Setup> {
  const dir = tempDir(t);
  const image = randomImage(pages, 6);
  const imagePath = writeImage(dir, image);
  const token = transport === 'tcp' ? 'a token for tcp' : undefined; // TCP needs one, loopback too
  const server = new PageServer({ image: Image.open([{ path: imagePath }]), token });
  const where = await server.listen(transport === 'unix' ? `unix:${join(dir, 'source.sock')}` : 'tcp:127.0.0.1:0');
  const source = where.kind === 'unix' ? `unix:${where.path}` : `tcp:127.0.0.1:${where.port}`;
  const handler = new VmmHandler({ source, token, background: { enabled: background } });
  const handlerSocket = join(dir, 'handler.sock');
  await handler.listen(handlerSocket);
  t.teardown(async () => {
    await handler.close();
    await server.close();
  });
  return { dir, imagePath, image, handler, handlerSocket, server };
}

/** Runs the VMM-like fixture to completion; resolves with its exit code and JSON report. */
async function runVmm(s: Setup, extra: string[] = []): Promise<{ code: number | null; report: Record<string, unknown> }> {
  const child = spawn(buildFixture('vmm'), ['--socket', s.handlerSocket, '--image', s.imagePath, ...extra], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const [code] = await once(child, 'close');
  return { code, report: out.trim() ? JSON.parse(out.trim().split('\n')[0]) : {} };
}

function openFdTargets(): string[] {
  return readdirSync('/proc/self/fd').map((f) => {
    try {
      return readlinkSync(`/proc/self/fd/${f}`);
    } catch {
      return '';
    }
  });
}

const sessionEnd = (h: VmmHandler) => once(h, 'session-end').then(([s]) => s as VmmSessionSummary);

for (const transport of ['unix', 'tcp'] as const) {
  t.test(`${transport} source: a VMM restores its whole memory lazily, byte-exact, from four threads`, async (t) => {
    // Without the background stream every page comes through a fault (or its window).
    const s = await setup(t, transport, 2048, false);
    const ended = sessionEnd(s.handler);
    const { code, report } = await runVmm(s, ['--threads', '4', '--order', 'random']);
    t.equal(code, 0, 'the VMM verified every byte');
    t.match(report, { ok: true, pages: 2048, mismatchedPages: 0 });
    const summary = await ended;
    t.equal(summary.complete, true);
    t.ok(summary.faults > 0, `faults served (${summary.faults})`);
    t.equal(summary.pagesOnDemand + summary.pagesWindow, 2048);
    t.equal(s.handler.activeSessions, 0, 'the session ended with the VMM');
  });
}

t.test('Firecracker handshake details: several regions at image offsets, page_size_kib alias', async (t) => {
  const s = await setup(t, 'unix', 3000);
  const ended = sessionEnd(s.handler);
  const { code, report } = await runVmm(s, ['--regions', '3', '--threads', '3', '--order', 'stride']);
  t.equal(code, 0);
  t.match(report, { ok: true, pages: 3000 });
  t.equal((await ended).complete, true);
});

t.test('several VMMs at once, each its own session', async (t) => {
  const s = await setup(t);
  const summaries: VmmSessionSummary[] = [];
  s.handler.on('session-end', (x) => summaries.push(x));
  const runs = await Promise.all([1, 2, 3].map((seed) => runVmm(s, ['--seed', String(seed), '--threads', '2'])));
  for (const r of runs) t.equal(r.code, 0);
  await until('three session summaries', () => summaries.length >= 3);
  t.equal(new Set(summaries.map((x) => x.vmmPid)).size, 3, 'three distinct VMMs');
  t.ok(summaries.every((x) => x.complete));
});

t.test('memory the VMM gives back (REMOVE) reads as zeros afterwards and is never fetched again', async (t) => {
  const s = await setup(t);
  const ended = sessionEnd(s.handler);
  const from = 64 * PAGE;
  const length = 32 * PAGE;
  const { code, report } = await runVmm(s, ['--dontneed', `${from}:${length}`, '--threads', '2']);
  t.equal(code, 0);
  t.match(report, { ok: true, nonZeroAfterDontneed: 0 });
  const summary = await ended;
  t.equal(summary.removedPages, 32);
  t.equal(summary.zeroFilledAfterRemove, 32, 'each given-back page was zero-filled on its next touch, not fetched');
});

t.test('malformed handshakes close that connection with a clear reason; the handler keeps serving', async (t) => {
  const s = await setup(t);
  const rejected: { code: string; message: string }[] = [];
  s.handler.on('rejected', (r) => rejected.push(r));
  const attempt = async (payload: string, fds: number[]) => {
    const socket = netConnect(s.handlerSocket);
    await once(socket, 'connect');
    const fd = (socket as unknown as { _handle: { fd: number } })._handle.fd;
    sendFds(fd, Buffer.from(payload), fds);
    socket.resume();
    await once(socket, 'close'); // the handler closes it
  };
  const region = (extra: object = {}) => ({ base_host_virt_addr: 0x7f0000000000, size: 16 * PAGE, offset: 0, page_size: PAGE, ...extra });
  const uffd = Userfaultfd.open();
  const memfd = memfdCreate('not-a-uffd');
  ftruncateSync(memfd, PAGE);
  t.teardown(() => {
    uffd.close();
    closeSync(memfd);
  });
  await attempt('{not json', [uffd.fd]);
  await attempt(JSON.stringify([region()]), []);
  await attempt(JSON.stringify([region()]), [memfd]);
  await attempt(JSON.stringify([region(), region({ base_host_virt_addr: 0x7f0000000000 + 8 * PAGE, offset: 16 * PAGE })]), [uffd.fd]);
  await attempt(JSON.stringify([region({ offset: 2040 * PAGE })]), [uffd.fd]);
  await attempt(JSON.stringify([region({ page_size: 1000 })]), [uffd.fd]);
  // MINOR mode: the memory file and memfd_offset go together, and the regions must fit the file.
  await attempt(JSON.stringify([region({ memfd_offset: 0 })]), [uffd.fd]);
  await attempt(JSON.stringify([region()]), [uffd.fd, memfd]);
  await attempt(JSON.stringify([region({ memfd_offset: 0 })]), [uffd.fd, memfd]);
  t.same(
    rejected.map((r) => r.code),
    [
      'ERR_PROTOCOL_MALFORMED',
      'ERR_PROTOCOL_MALFORMED',
      'ERR_PROTOCOL_MALFORMED',
      'ERR_PROTOCOL_OUT_OF_RANGE',
      'ERR_PROTOCOL_OUT_OF_RANGE',
      'ERR_PROTOCOL_MALFORMED',
      'ERR_PROTOCOL_MALFORMED',
      'ERR_PROTOCOL_MALFORMED',
      'ERR_PROTOCOL_OUT_OF_RANGE',
    ],
  );
  t.match(
    rejected.map((r) => r.message),
    [
      /not JSON/,
      /must carry the userfaultfd/,
      /not a userfaultfd/,
      /overlap in memory/,
      /outside the .*image/,
      /power of two/,
      /names memfd_offset, but no memory file/,
      /no region names memfd_offset/,
      /does not fit the 4096-byte memory file/,
    ],
  );
  const { code } = await runVmm(s);
  t.equal(code, 0, 'a well-formed VMM is still served');
});

t.test('a VMM that exits mid-way is cleaned up: no session, no fd, no source session left', async (t) => {
  const s = await setup(t, 'unix', 16384);
  const fdsBefore = readdirSync('/proc/self/fd').length;
  const child = spawn(buildFixture('vmm'), ['--socket', s.handlerSocket, '--image', s.imagePath, '--hold'], { stdio: ['pipe', 'pipe', 'inherit'] });
  await once(s.handler, 'session-start');
  t.equal(s.handler.activeSessions, 1);
  const ended = sessionEnd(s.handler);
  const closed = once(child, 'close'); // (listen first: it may come before the session ends)
  child.kill('SIGKILL'); // the VMM dies, possibly mid-transfer
  const summary = await ended;
  await closed;
  t.ok(summary.vmmPid === child.pid);
  t.equal(s.handler.activeSessions, 0);
  await until('the source to drop every session', () => s.server.sessions.size === 0);
  // (Fds of earlier tests may still be closing, so "no more than before".)
  t.ok(readdirSync('/proc/self/fd').length <= fdsBefore, 'every fd of the session was closed');
  t.notOk(openFdTargets().includes('anon_inode:[userfaultfd]'), 'the VMM userfaultfd was closed');
});

t.test('idle connections cannot starve the handler: a VMM behind eight silent peers is served; past the cap, silent peers are closed at once', async (t) => {
  // On the old main each silent peer held a libuv pool thread in a blocking
  // poll: with four of them no VMM's handshake was read until they timed out.
  const dir = tempDir(t);
  const image = randomImage(512);
  const imagePath = writeImage(dir, image);
  const server = new PageServer({ image: Image.open([{ path: imagePath }]) });
  const where = await server.listen(`unix:${join(dir, 'source.sock')}`);
  const handler = new VmmHandler({ source: `unix:${where.kind === 'unix' ? where.path : ''}`, handshakeTimeoutMs: 10 * 60_000 });
  const handlerSocket = join(dir, 'handler.sock');
  await handler.listen(handlerSocket);
  t.teardown(async () => {
    await handler.close();
    await server.close();
  });
  const idle: ReturnType<typeof netConnect>[] = [];
  t.teardown(() => {
    for (const s of idle) s.destroy();
  });
  for (let i = 0; i < 8; i++) {
    const s = netConnect(handlerSocket);
    s.on('error', () => {});
    idle.push(s);
    await once(s, 'connect');
  }
  const { code } = await runVmm({ dir, imagePath, image, handler, handlerSocket, server });
  t.equal(code, 0, 'the VMM was served');
  let closed = 0;
  for (let i = 0; i < MAX_PENDING_HANDSHAKES; i++) {
    const s = netConnect(handlerSocket);
    s.on('error', () => {});
    s.once('close', () => closed++);
    idle.push(s);
  }
  // 8 + 64 silent peers: 8 are over the cap and closed without waiting for their (ten-minute) timeout.
  await until('8 peers closed', () => closed >= 8);
  t.equal(closed, 8, 'exactly the peers over the cap were closed');
});

/** Runs the fixture with --hold: it stays connected (as a VMM does) until release() closes its stdin. */
function holdVmm(s: Setup, extra: string[] = []): { done: Promise<{ code: number | null; report: Record<string, unknown> }>; release: () => void } {
  const child = spawn(buildFixture('vmm'), ['--socket', s.handlerSocket, '--image', s.imagePath, '--hold', ...extra], { stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const done = once(child, 'close').then(([code]) => ({ code: code as number | null, report: out.trim() ? JSON.parse(out.trim().split('\n')[0]) : {} }));
  return { done, release: () => child.stdin.end() };
}

const installedCheck = (h: VmmHandler) => once(h, 'installed-check').then(([c]) => c as InstalledCheck & { vmmPid: number });

t.test('the handler checks every page it installed against the source image, though the guest has written to them since', async (t) => {
  const s = await setup(t, 'unix', 2048);
  const checked = installedCheck(s.handler);
  const ended = sessionEnd(s.handler);
  const vmm = holdVmm(s, ['--scribble', '--threads', '2']);
  const check = await checked;
  vmm.release();
  const { code } = await vmm.done;
  t.equal(code, 0, 'the VMM saw every byte right');
  t.same(
    { result: check.result, checkedPages: check.checkedPages, mismatchedRegions: check.mismatchedRegions },
    { result: 'match', checkedPages: 2048, mismatchedRegions: [] },
  );
  const summary = await ended;
  t.equal(summary.installedCheck?.result, 'match', 'the summary reports the match');
});

t.test('pages of the image no guest region maps are left out of the check, and the rest still matches', async (t) => {
  const s = await setup(t, 'unix', 3000);
  const checked = installedCheck(s.handler);
  const vmm = holdVmm(s, ['--size', String(2000 * PAGE), '--regions', '2']);
  const check = await checked;
  vmm.release();
  t.equal((await vmm.done).code, 0);
  t.equal(check.result, 'match');
  t.equal(check.checkedPages, 2000, 'the 1000 pages past the guest are not counted');
});

t.test('a byte flipped on a plaintext link: the page goes into the guest, and the handler reports the mismatch', async (t) => {
  const dir = tempDir(t);
  const image = randomImage(512, 6);
  const imagePath = writeImage(dir, image);
  const token = 'plaintext on purpose';
  const server = new PageServer({ image: Image.open([{ path: imagePath }]), token, plaintextTcp: true });
  const where = await server.listen('tcp:127.0.0.1:0');
  const proxy = await FaultProxy.start(t, `tcp:127.0.0.1:${where.kind === 'tcp' ? where.port : 0}`);
  // Connection 1 is the urgent channel: past its `attached` frame and the first run header, inside the first page served.
  proxy.inject({ connection: 1, direction: 'down', afterBytes: 600, action: 'flip' });
  const handler = new VmmHandler({ source: proxy.address, token, acceptPlaintextTcp: true, background: { enabled: false } });
  const handlerSocket = join(dir, 'handler.sock');
  await handler.listen(handlerSocket);
  t.teardown(async () => {
    await handler.close();
    await server.close();
  });
  const s = { dir, imagePath, image, handler, handlerSocket, server };
  const checked = installedCheck(handler);
  const ended = sessionEnd(handler);
  const vmm = holdVmm(s, ['--threads', '1']);
  const check = await checked;
  vmm.release();
  const { report } = await vmm.done;
  t.equal(proxy.fired.length, 1, 'the byte was flipped');
  t.equal(report.mismatchedPages, 1, 'the guest got the corrupted page (plaintext cannot stop it)');
  t.equal(check.result, 'mismatch', 'and the handler says so');
  t.same(check.mismatchedRegions, [0]);
  t.equal((await ended).installedCheck?.result, 'mismatch');
});

t.test('pages that travel as zero runs (a hole in the image file) are checked too', async (t) => {
  const s = await setup(t, 'unix', 1536);
  // The image grows by 512 pages of hole: the source sends them as zero runs.
  const fd = openSync(s.imagePath, 'r+');
  ftruncateSync(fd, 2048 * PAGE);
  closeSync(fd);
  await s.handler.close();
  await s.server.close();
  const server = new PageServer({ image: Image.open([{ path: s.imagePath }]) });
  const where = await server.listen(`unix:${join(s.dir, 'source2.sock')}`);
  const handler = new VmmHandler({ source: `unix:${where.kind === 'unix' ? where.path : ''}` });
  const handlerSocket = join(s.dir, 'handler2.sock');
  await handler.listen(handlerSocket);
  t.teardown(async () => {
    await handler.close();
    await server.close();
  });
  const checked = installedCheck(handler);
  const ended = sessionEnd(handler);
  const vmm = holdVmm({ ...s, handler, handlerSocket, server }, ['--threads', '2']);
  const check = await checked;
  vmm.release();
  t.equal((await vmm.done).code, 0);
  t.equal(check.result, 'match');
  t.equal(check.checkedPages, 2048);
  t.ok((await ended).zeroPages >= 512, 'the hole came as zero pages');
});

t.test('a running handler keeps checking its source: it says when the source stops answering and when it is back', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(16));
  const address = `unix:${join(dir, 'source.sock')}`;
  const lines: { level: number; msg: string }[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line)) });
  const startSource = async () => {
    const server = new PageServer({ image: Image.open([{ path: imagePath }]) });
    await server.listen(address);
    return server;
  };
  let server = await startSource();
  const handler = new VmmHandler({ source: address, logger });
  t.teardown(async () => {
    await handler.close();
    await server.close();
  });
  await handler.checkSource();
  handler.watchSource(30);
  const logged = (what: RegExp) => until(`a log line ${what}`, () => lines.some((l) => what.test(l.msg)));
  await server.close();
  await logged(/the source does not answer/);
  t.equal(lines.filter((l) => /does not answer/.test(l.msg)).length, 1, 'said once, not at every check');
  server = await startSource();
  await logged(/the source answers again/);
  t.pass('and it says when the source is back');
});

t.test("the handler logs each live VMM session's progress periodically", async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(512, 3));
  const server = new PageServer({ image: Image.open([{ path: imagePath }]) });
  const where = await server.listen(`unix:${join(dir, 'source.sock')}`);
  const records: { msg: string; vmmPid?: number; residentPages?: number; totalPages?: number; faultP50Us?: number; state?: string }[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => records.push(JSON.parse(line)) });
  const handler = new VmmHandler({ source: `unix:${where.kind === 'unix' ? where.path : ''}`, logger, progressIntervalMs: 20 });
  const handlerSocket = join(dir, 'handler.sock');
  await handler.listen(handlerSocket);
  t.teardown(async () => {
    await handler.close();
    await server.close();
  });
  const checked = installedCheck(handler);
  const vmm = holdVmm({ dir, imagePath, image: Buffer.alloc(0), handler, handlerSocket, server }, ['--threads', '1']);
  await checked;
  await until('progress with 512 resident pages', () => records.some((r) => r.msg === 'VMM session progress' && r.residentPages === 512));
  vmm.release();
  t.equal((await vmm.done).code, 0);
  const progress = records.filter((r) => r.msg === 'VMM session progress');
  t.ok(progress.length >= 1, `${progress.length} progress records`);
  t.match(progress[progress.length - 1], { vmmPid: Number, totalPages: 512, residentPages: 512, faultP50Us: Number, state: String });
});

t.test('replicas: with its source down, the handler checks and serves VMMs from a replica', async (t) => {
  const dir = tempDir(t);
  const image = randomImage(512, 4);
  const imagePath = writeImage(dir, image);
  const server = new PageServer({ image: Image.open([{ path: imagePath }]) });
  await server.listen(`unix:${join(dir, 'replica.sock')}`);
  const handler = new VmmHandler({ source: `unix:${join(dir, 'nobody.sock')}`, replicas: [`unix:${join(dir, 'replica.sock')}`] });
  const handlerSocket = join(dir, 'handler.sock');
  await handler.listen(handlerSocket);
  t.teardown(async () => {
    await handler.close();
    await server.close();
  });
  t.equal((await handler.checkSource()).regions.length, 1, 'the replica answers for the source');
  const ended = sessionEnd(handler);
  const { code } = await runVmm({ dir, imagePath, image, handler, handlerSocket, server }, ['--threads', '2']);
  t.equal(code, 0, 'the VMM verified every byte');
  t.equal((await ended).recovery?.source, `unix:${join(dir, 'replica.sock')}`);
});

for (const [mode, background] of [
  ['move', false],
  ['move', true],
  ['grow', false],
  ['shrink', false],
] as const) {
  t.test(
    `the VMM mremaps guest memory mid-restore (${mode}${background ? ', background on' : ''}): byte-exact pages at the new place, and the installed-pages check follows`,
    async (t) => {
      const s = await setup(t, 'unix', 2048, background);
      const checked = installedCheck(s.handler);
      const ended = sessionEnd(s.handler);
      const vmm = holdVmm(s, ['--mremap', mode, '--threads', '2', '--order', 'random']);
      const check = await checked;
      vmm.release();
      const { code, report } = await vmm.done;
      t.equal(code, 0, 'the VMM verified every page it still has');
      t.match(report, { ok: true, mismatchedPages: 0, remapped: mode, grownNonZero: 0 });
      t.equal(check.result, 'match', 'the pages installed match the source image');
      // Shrink: the 64 pages cut off were given back (those installed before the cut were checked as installed).
      if (mode === 'shrink') t.ok(check.checkedPages >= 2048 - 64, `${check.checkedPages} pages checked`);
      else t.equal(check.checkedPages, 2048, 'every page was installed and checked, moved or not');
      const summary = await ended;
      t.equal(summary.complete, true);
      t.equal(summary.poisonedPages, 0);
    },
  );
}

// From a local image the fault thread installs each faulted page itself. A
// fault at the old place read in the same batch as the move that follows it
// used to find nothing mapped (ENOENT) there and give the page back as if
// unmapped: the VMM then read zeros. Now the page goes in at its new place.
t.test('the VMM mremaps guest memory mid-restore, served from a local image: no page is given back for a move (20 VMMs)', async (t) => {
  const dir = tempDir(t);
  const image = randomImage(2048, 6);
  const imagePath = writeImage(dir, image);
  const local = Image.open([{ path: imagePath }]);
  const handler = new VmmHandler({ image: local, background: { enabled: true } });
  const handlerSocket = join(dir, 'handler.sock');
  await handler.listen(handlerSocket);
  t.teardown(async () => {
    await handler.close();
    local.close();
  });
  const s = { dir, imagePath, image, handler, handlerSocket } as unknown as Setup;
  for (let i = 0; i < 20; i++) {
    const checked = installedCheck(handler);
    const vmm = holdVmm(s, ['--mremap', 'move', '--threads', '2', '--order', 'random']);
    const check = await checked;
    vmm.release();
    const { code, report } = await vmm.done;
    if (code !== 0 || check.checkedPages !== 2048) {
      t.fail(`VMM ${i}: exit ${code}, ${JSON.stringify(report)}, ${check.checkedPages} pages checked`);
      return;
    }
  }
  t.pass('20 VMMs moved their memory mid-restore, each verified every page, and every page was installed and checked');
});

t.test("a VMM's life is its own state table, each change logged: served (starting, serving, ended) or refused (starting, refused, ended)", async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(256, 3));
  const server = new PageServer({ image: Image.open([{ path: imagePath }]) });
  const where = await server.listen(`unix:${join(dir, 'source.sock')}`);
  const records: { msg: string; vmmPid?: number; state?: string; from?: string; reason?: string }[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => records.push(JSON.parse(line)) });
  const handler = new VmmHandler({ source: `unix:${where.kind === 'unix' ? where.path : ''}`, logger, progressIntervalMs: 0 });
  const handlerSocket = join(dir, 'handler.sock');
  await handler.listen(handlerSocket);
  t.teardown(async () => {
    await handler.close();
    await server.close();
  });
  const vmmStates = (pid: number) => records.filter((r) => r.msg === 'VMM state' && r.vmmPid === pid).map((r) => r.state);
  const ended = sessionEnd(handler);
  const { code } = await runVmm({ dir, imagePath, image: Buffer.alloc(0), handler, handlerSocket, server });
  t.equal(code, 0, 'the VMM was served');
  const summary = await ended;
  t.same(vmmStates(summary.vmmPid), ['starting', 'serving', 'ended'], 'served: each change logged');
  t.match(
    records.find((r) => r.msg === 'VMM state' && r.vmmPid === summary.vmmPid && r.state === 'ended'),
    { from: 'serving', reason: 'the VMM hung up' },
  );

  // A handshake that does not fit the image: refused once the source's regions are known, its guest poisoned.
  const uffd = Userfaultfd.open();
  t.teardown(() => uffd.close());
  const rejected = once(handler, 'rejected').then(([r]) => r as { pid: number; code: string });
  const socket = netConnect(handlerSocket);
  await once(socket, 'connect');
  const payload = JSON.stringify([{ base_host_virt_addr: 0x7f0000000000, size: 16 * PAGE, offset: 1000 * PAGE, page_size: PAGE }]);
  sendFds((socket as unknown as { _handle: { fd: number } })._handle.fd, Buffer.from(payload), [uffd.fd]);
  socket.resume();
  const r = await rejected;
  t.equal(r.code, 'ERR_PROTOCOL_OUT_OF_RANGE');
  t.same(vmmStates(r.pid), ['starting', 'refused', 'ended'], 'refused: each change logged');
  await once(socket, 'close');
});
