import t from 'tap';
import { spawn } from 'node:child_process';
import { closeSync, ftruncateSync } from 'node:fs';
import { socketPair, sendFds, receiveFds, peerCredentials } from '../lib/fd-passing.js';
import { Userfaultfd, type UffdEvent } from '../lib/uffd.js';
import { memfdCreate, mapFile } from '../lib/memory.js';
import { PAGE, buildFixture, randomImage, tempDir, writeImage } from './helpers.js';

t.test('fds travel with a payload and arrive usable', async (t) => {
  const [a, b] = socketPair();
  t.teardown(() => {
    closeSync(a);
    closeSync(b);
  });
  const memfd = memfdCreate('passed');
  ftruncateSync(memfd, PAGE);
  const sent = mapFile(memfd, PAGE);
  sent.buffer().fill(0x42);
  t.equal(sendFds(a, Buffer.from('{"hello":1}'), [memfd]), 11);
  const got = await receiveFds(b, { timeoutMs: 5000 });
  t.equal(got.payload.toString(), '{"hello":1}');
  t.equal(got.fds.length, 1);
  t.not(got.fds[0], memfd, 'a new fd number for the same file');
  const seen = mapFile(got.fds[0], PAGE);
  t.ok(
    seen.buffer().every((x) => x === 0x42),
    'the received memfd shows the same memory',
  );
  for (const m of [sent, seen]) m.unmap();
  for (const fd of [memfd, got.fds[0]]) closeSync(fd);
});

t.test('peer credentials name the other end', async (t) => {
  const [a, b] = socketPair();
  t.teardown(() => {
    closeSync(a);
    closeSync(b);
  });
  t.same(peerCredentials(a), { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() });
});

t.test('receive times out with ETIMEDOUT and reports a closed peer as an empty payload', async (t) => {
  const [a, b] = socketPair();
  await t.rejects(receiveFds(b, { timeoutMs: 10 }), { code: 'ETIMEDOUT', syscall: 'poll' });
  closeSync(a);
  const got = await receiveFds(b, { timeoutMs: 5000 });
  t.same([got.payload.length, got.fds], [0, []]);
  closeSync(b);
});

t.test('bad arguments are refused before they reach the kernel', async (t) => {
  t.throws(() => sendFds(-1, Buffer.from('x')), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => sendFds(0, Buffer.alloc(0)), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => sendFds(0, 'x' as never), { code: 'ERR_INVALID_ARG_TYPE' });
  t.throws(() => sendFds(0, Buffer.from('x'), [1.5]), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => receiveFds(0, { maxFds: 1000 }), { code: 'ERR_OUT_OF_RANGE' });
});

t.test('a child hands over the userfaultfd of its own memory; the parent serves its faults', async (t) => {
  const dir = tempDir(t);
  const pages = 256;
  const image = randomImage(pages, 5);
  const imagePath = writeImage(dir, image);
  const removeFrom = 16 * PAGE;
  const removeLength = 8 * PAGE;
  const [ours, theirs] = socketPair();
  const child = spawn(buildFixture('vmm'), ['--fd', '3', '--image', imagePath, '--threads', '4', '--dontneed', `${removeFrom}:${removeLength}`, '--unmap'], {
    stdio: ['ignore', 'pipe', 'inherit', theirs],
  });
  closeSync(theirs);
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', resolve));

  const hello = await receiveFds(ours, { timeoutMs: 10000 });
  t.equal(hello.fds.length, 1, 'the userfaultfd came as SCM_RIGHTS');
  const [region] = JSON.parse(hello.payload.toString());
  t.same(Object.keys(region).sort(), ['base_host_virt_addr', 'offset', 'page_size', 'page_size_kib', 'size']);
  t.equal(region.size, pages * PAGE);
  const uffd = Userfaultfd.fromFd(hello.fds[0]);
  const base: number = region.base_host_virt_addr;

  // Serve from this process into the child's memory; pages it gave back come as zeros.
  let finished = false;
  void exited.then(() => (finished = true));
  const events: UffdEvent[] = [];
  const removed = new Set<number>();
  while (!finished) {
    if (!(await uffd.waitReadable(20))) continue;
    for (const ev of uffd.readEvents()) {
      events.push(ev);
      if (ev.type === 'remove') for (let a = ev.start; a < ev.end; a += PAGE) removed.add((a - base) / PAGE);
      if (ev.type !== 'pagefault') continue;
      const page = Math.floor((ev.address - base) / PAGE);
      const r = removed.has(page) ? uffd.zeroPage(base + page * PAGE, PAGE) : uffd.copy(base + page * PAGE, image, { sourceOffset: page * PAGE, length: PAGE });
      if (r.code !== null && r.code !== 'EEXIST') throw new Error(`resolve stopped with ${r.code}`);
    }
  }
  t.equal(await exited, 0, 'the child verified every byte');
  const report = JSON.parse(out);
  t.match(report, { ok: true, pages, mismatchedPages: 0, nonZeroAfterDontneed: 0 });
  const faults = events.filter((e) => e.type === 'pagefault');
  t.ok(faults.length >= pages, `every page faulted at least once (${faults.length})`);
  t.ok(new Set(faults.map((e) => e.type === 'pagefault' && e.threadId)).size > 1, 'faults came from several threads');
  t.same(
    events.filter((e) => e.type === 'remove'),
    [{ type: 'remove', start: base + removeFrom, end: base + removeFrom + removeLength }],
  );
  t.same(
    events.filter((e) => e.type === 'unmap'),
    [{ type: 'unmap', start: base, end: base + pages * PAGE }],
  );
  uffd.close();
  closeSync(ours);
});
