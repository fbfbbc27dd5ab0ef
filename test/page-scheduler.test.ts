// The page scheduler's own unit tests (test/native/page_scheduler.cc, built
// with the addon by `npx cmake-js compile`): the order pages go in (requested,
// window in units, working set, background following the last request), each
// page once, with several threads claiming at once. Each of its TAP lines is
// an assertion here.
import t, { type Test } from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { Socket } from 'node:net';
import { join } from 'node:path';
import { native } from '../lib/native.js';
import { socketPair } from '../lib/fd-passing.js';
import { RUN_HEADER_BYTES, encodePageRequest } from '../lib/wire.js';
import { PAGE, here, randomImage } from './helpers.js';

const binary = join(here, '..', 'build', 'tests', 'page_scheduler_test');

t.test('the page scheduler yields each page once, in the order of its reasons, with concurrent claimers', async (t) => {
  t.ok(existsSync(binary), `${binary} is built (npx cmake-js compile)`);
  if (!existsSync(binary)) return;
  const run = spawnSync(binary, { encoding: 'utf8', timeout: 120_000 });
  t.equal(run.error, undefined, 'it ran');
  const lines = run.stdout.split('\n');
  const results = lines.map((l) => /^(not ok|ok) \d+ - (.*)$/.exec(l)).filter((m) => m !== null);
  const plan = lines.map((l) => /^1\.\.(\d+)$/.exec(l)).find((m) => m !== null);
  t.ok(plan, 'it printed its plan (it ran to the end)');
  t.equal(results.length, Number(plan?.[1]), 'every planned assertion reported');
  for (const [, verdict, name] of results) t.ok(verdict === 'ok', name);
  t.equal(run.status, 0, `it exits 0${run.stderr ? `: ${run.stderr}` : ''}`);
});

// ---- the sinks: the same order, seen on their own wire ----

const REASON = { requested: 0, window: 1, background: 2, workingSet: 3 } as const;
const KIND = { data: 0x41544144, end: 0x20444e45 } as const;

/** Reads a stream socket as it comes: `take(n)` resolves with its next n bytes, or fails after `timeoutMs` without them. */
function reader(socket: Socket, timeoutMs = 20_000) {
  let buffered = Buffer.alloc(0);
  let wake: (() => void) | null = null;
  socket.on('data', (d: Buffer) => {
    buffered = Buffer.concat([buffered, d]);
    wake?.();
  });
  return async function take(n: number): Promise<Buffer> {
    if (buffered.length < n)
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`timed out waiting for ${n} bytes (have ${buffered.length})`)), timeoutMs);
        wake = () => {
          if (buffered.length < n) return;
          clearTimeout(timer);
          wake = null;
          resolve();
        };
      });
    const out = buffered.subarray(0, n);
    buffered = buffered.subarray(n);
    return out;
  };
}

type Run = { kind: number; first: number; count: number; reason: number };

/** The next run on a data channel (its header, and its pages checked against the image). */
async function nextRun(take: (n: number) => Promise<Buffer>, image: Buffer): Promise<Run> {
  const h = await take(RUN_HEADER_BYTES);
  const run = { kind: h.readUInt32LE(0), first: Number(h.readBigUInt64LE(8)), count: h.readUInt32LE(16), reason: h.readUInt32LE(20) };
  if (run.kind === KIND.data) {
    const data = await take(run.count * PAGE);
    if (!data.equals(image.subarray(run.first * PAGE, (run.first + run.count) * PAGE))) throw new Error(`run ${run.first}+${run.count}: not the image's pages`);
  }
  return run;
}

function pair(t: Test): [number, Socket] {
  const [ours, theirs] = socketPair();
  const socket = new Socket({ fd: ours, readable: true, writable: true });
  t.teardown(() => void socket.destroy());
  return [theirs, socket];
}

function entries(pages: number[]): Buffer {
  const b = Buffer.alloc(pages.length * 8);
  pages.forEach((p, i) => b.writeBigUInt64LE(BigInt(p), i * 8));
  return b;
}

t.test('the page server sends a request, its window, the working set, then the background from after the request: each page once', async (t) => {
  const image = randomImage(64);
  const [urgentFd, urgent] = pair(t);
  const [bulkFd, bulk] = pair(t);
  const session = new native.PageServerSession({
    regions: [{ source: image, sourceIsMapping: false, offset: 0, length: image.length, pageSize: PAGE }],
    urgentFd,
    bulkFd,
    windowForward: 2,
    windowBackward: 1,
    background: false,
    rateBytesPerSecond: 0,
    onEvent: () => {},
  });
  t.teardown(() => session.stop());
  session.start();
  const fromUrgent = reader(urgent);
  const fromBulk = reader(bulk);
  urgent.write(encodePageRequest(0, 40));
  const answer = [await nextRun(fromUrgent, image), await nextRun(fromUrgent, image), await nextRun(fromUrgent, image)];
  t.same(
    answer.map((r) => [r.first, r.count, r.reason]),
    [
      [40, 1, REASON.requested],
      [41, 2, REASON.window],
      [39, 1, REASON.window],
    ],
    'on the urgent channel: the requested page, then its window (forward, then backward)',
  );
  session.prefetch(entries([10, 11, 12, 41, 30]));
  const set = [await nextRun(fromBulk, image), await nextRun(fromBulk, image)];
  t.same(
    set.map((r) => [r.first, r.count, r.reason]),
    [
      [10, 3, REASON.workingSet],
      [30, 1, REASON.workingSet],
    ],
    'on the bulk channel: the working set in its order, each entry with its cluster, what was sent already left out',
  );
  session.startBackground();
  const background: Run[] = [];
  for (let run = await nextRun(fromBulk, image); run.kind !== KIND.end; run = await nextRun(fromBulk, image)) background.push(run);
  t.same(
    background.map((r) => [r.first, r.count, r.reason]),
    [
      [43, 21, REASON.background],
      [0, 10, REASON.background],
      [13, 17, REASON.background],
      [31, 8, REASON.background],
    ],
    'then the background, from after the last request to the end, then round from the start',
  );
  const sent = new Array<number>(64).fill(0);
  for (const r of [...answer, ...set, ...background]) for (let p = r.first; p < r.first + r.count; p++) sent[p]++;
  t.ok(
    sent.every((n) => n === 1),
    'every page exactly once',
  );
  t.match(session.stats(), { pagesRequested: 1, pagesWindow: 3, pagesPrefetched: 4, pagesBackground: 56, pagesSent: 64 }, 'and the figures say so');
});

t.test('the QEMU stream sends a request with its window in one part, in address order, each page once', async (t) => {
  const pages = 64;
  const image = randomImage(pages);
  const [fd, socket] = pair(t);
  const preamble = Buffer.from('a preamble of our own');
  const events: { type: string }[] = [];
  const stream = new native.QemuRamStream({
    fd,
    preamble,
    section: 7,
    blocks: [{ name: 'pc.ram', spec: { source: image, sourceIsMapping: false, offset: 0, length: image.length, pageSize: PAGE } }],
    windowForward: 2,
    windowBackward: 1,
    background: false,
    onEvent: (e) => events.push(e),
  });
  t.teardown(() => stream.stop());
  stream.start();
  const take = reader(socket);
  t.same(await take(preamble.length), preamble, 'the preamble first');
  const ask = (first: number, count: number, name?: string) => {
    const body = Buffer.alloc(12 + (name ? 1 + name.length : 0));
    body.writeBigUInt64BE(BigInt(first * PAGE), 0);
    body.writeUInt32BE(count * PAGE, 8);
    if (name) {
      body.writeUInt8(name.length, 12);
      body.write(name, 13);
    }
    const head = Buffer.alloc(4);
    head.writeUInt16BE(name ? 3 : 4, 0); // REQ_PAGES_ID, REQ_PAGES
    head.writeUInt16BE(body.length, 2);
    socket.write(Buffer.concat([head, body]));
  };
  /** One section part: the pages it holds, in order, each checked against the image. */
  const part = async (): Promise<number[]> => {
    const head = await take(5);
    t.equal(head[0], 0x02, 'a section part');
    const got: number[] = [];
    for (;;) {
      const word = (await take(8)).readBigUInt64BE(0);
      if (word === 0x10n) break; // EOS
      const page = Number(word >> 12n);
      if (!(word & 0x20n)) await take((await take(1))[0]); // the block's name, after its length (the first record of a part names it)
      if (word & 0x02n) {
        t.equal((await take(1))[0], 0, 'a zero page');
      } else if (!(await take(PAGE)).equals(image.subarray(page * PAGE, (page + 1) * PAGE))) throw new Error(`page ${page}: not the image's`);
      got.push(page);
    }
    await take(5); // footer, section
    return got;
  };
  ask(40, 1, 'pc.ram');
  t.same(await part(), [39, 40, 41, 42], 'the requested page and its window, in address order');
  ask(41, 3);
  t.same(await part(), [43, 44, 45], 'a request overlapping what was sent: only the pages not sent yet');
  t.match(stream.stats(), { pagesOnDemand: 2, pagesWindow: 5, pagesBackground: 0 }, 'counted by their reason');
  t.same(
    events.map((e) => e.type),
    ['running'],
    'no error',
  );
});
