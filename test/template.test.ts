// Templates: many VMMs restoring one image on this host share one copy of it.
// The handler fills the image once into shared memory (memfds), each VMM
// fixture maps them privately (copy on write) and registers for MINOR faults;
// the handler releases each fault with UFFDIO_CONTINUE. Real fixture
// processes, real memfds, a real source over a unix socket.
import t from 'tap';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { VmmHandler, type VmmSessionSummary } from '../client/vmm-handler.js';
import { buildFixture, cliCommand, FAST_RECOVERY, PAGE, randomImage, startServeCli, tempDir, writeImage } from './helpers.js';
import type { Test } from 'tap';

const PAGES = 2048;

/** A handler in template mode, over a source of ours (or the image file itself). */
async function templateHandler(t: Test, from: 'source' | 'image', background: boolean) {
  const dir = tempDir(t);
  const bytes = randomImage(PAGES, 9);
  const imagePath = writeImage(dir, bytes);
  const image = Image.open([{ path: imagePath }]);
  let server: PageServer | null = null;
  let handler: VmmHandler;
  if (from === 'image') {
    handler = new VmmHandler({ image, template: 'golden', background: { enabled: background } });
  } else {
    server = new PageServer({ image });
    const where = await server.listen(`unix:${join(dir, 'source.sock')}`);
    handler = new VmmHandler({ source: `unix:${(where as { path: string }).path}`, template: 'golden', background: { enabled: background } });
  }
  const socket = join(dir, 'handler.sock');
  await handler.listen(socket);
  const ends: VmmSessionSummary[] = [];
  handler.on('session-end', (s: VmmSessionSummary) => ends.push(s));
  t.teardown(async () => {
    await handler.close();
    await server?.close();
    image.close();
  });
  return { handler, server, socket, imagePath, bytes, ends };
}

/** A clone: the fixture in --template mode, held open until release(); its report, and its memory while held. */
async function startClone(socket: string, imagePath: string, extra: string[]) {
  const child = spawn(buildFixture('vmm'), ['--socket', socket, '--image', imagePath, '--template', '--hold', ...extra], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const closed = once(child, 'close');
  const line = await createInterface({ input: child.stdout! })[Symbol.asyncIterator]().next();
  const report = JSON.parse(line.value ?? '{}');
  // Anonymous memory: what the guest holds of its own (its writes); the template's pages it maps are file pages.
  const anonymousKb = Number(/^Anonymous:\s+(\d+) kB/m.exec(readFileSync(`/proc/${child.pid}/smaps_rollup`, 'utf8'))?.[1]);
  return {
    report,
    anonymousKb,
    async release() {
      child.stdin!.end();
      const [code] = await closed;
      return code as number;
    },
  };
}

for (const from of ['source', 'image'] as const) {
  t.test(`${from}: clones share one copy of the image, each sees it byte-exact and only its own writes`, async (t) => {
    const h = await templateHandler(t, from, false);
    // The first clone faults its pages in (no background), then writes over every page.
    const first = await startClone(h.socket, h.imagePath, ['--threads', '4', '--order', 'random', '--seed', '3', '--scribble']);
    t.match(first.report, { ok: true, pages: PAGES, mismatchedPages: 0, ownWritesKept: true }, 'the first clone saw the image, then its own writes');
    // The next clones see the image, not the first clone's writes, and copy none of it.
    const others = await Promise.all([5, 7].map((seed) => startClone(h.socket, h.imagePath, ['--threads', '2', '--order', 'random', '--seed', String(seed)])));
    for (const [i, c] of others.entries()) {
      t.match(c.report, { ok: true, pages: PAGES, mismatchedPages: 0 }, `clone ${i + 2} saw the image byte for byte, none of the first clone's writes`);
      t.ok(c.anonymousKb < (PAGES * PAGE) / 1024 / 10, `clone ${i + 2} holds no copy of the image (${c.anonymousKb} kB of its own memory)`);
    }
    t.ok(first.anonymousKb >= (PAGES * PAGE) / 1024, `the writing clone's pages are its own copies (${first.anonymousKb} kB)`);
    for (const c of [first, ...others]) t.equal(await c.release(), 0);
    await waitFor(() => h.ends.length === 3);
    for (const s of h.ends) {
      t.equal(s.complete, true);
      t.match(s.installedCheck, { result: 'match', checkedPages: PAGES }, "each clone's pages match the template, which matched the source");
    }
    // The first clone's faults filled the template; the later ones had it mapped whole as they joined.
    t.equal(h.ends.filter((s) => s.faults > 0).length, 1, 'only the first clone faulted');
    if (h.server) {
      const sent = h.server.figures();
      const pages = sent.pagesRequested + sent.pagesWindow + sent.pagesBackground;
      t.ok(pages <= PAGES, `the source sent each page at most once for all three clones (${pages} of ${PAGES})`);
      t.equal(sent.pagesResent, 0, 'and none again');
    }
  });
}

t.test('with the background on, a template fills by itself and later clones fault on nothing missing', async (t) => {
  const h = await templateHandler(t, 'source', true);
  // The template is whole once the first clone's pages were checked against the source (on a loaded
  // machine, after that clone is done with them): it is released only then. Bounded, not timed.
  const checked = once(h.handler, 'installed-check');
  const first = await startClone(h.socket, h.imagePath, ['--threads', '2']);
  t.match(first.report, { ok: true, mismatchedPages: 0 });
  await Promise.race([checked, new Promise((_, reject) => setTimeout(() => reject(new Error('no installed check within 60 s')), 60_000).unref())]);
  t.equal(await first.release(), 0);
  await waitFor(() => h.ends.length === 1);
  t.match(h.ends[0].installedCheck, { result: 'match' });
  // The template is whole now: a new clone's faults are all on pages in the page cache.
  const second = await startClone(h.socket, h.imagePath, ['--threads', '2', '--order', 'stride']);
  t.match(second.report, { ok: true, mismatchedPages: 0 });
  t.equal(await second.release(), 0);
  await waitFor(() => h.ends.length === 2);
  t.equal(h.ends[1].pagesOnDemand, 0, 'no page of the second clone waited for the source');
  t.equal(h.ends[1].faults, 0, 'the whole template was mapped into the second clone as it joined: it never faulted');
  // A page asked for while the background had it on the way goes again on the urgent channel (pagesResent): one
  // copy in flight per page, whatever the number of clones.
  const sent = h.server!.figures();
  t.ok(sent.pagesRequested + sent.pagesWindow + sent.pagesBackground - sent.pagesResent <= PAGES, 'each page sent once for both clones');
  t.ok(sent.pagesResent <= sent.requests, `only pages asked for while on their way went twice (${sent.pagesResent})`);
});

t.test('a clone that sends a memory file of its own is refused', async (t) => {
  const h = await templateHandler(t, 'image', true);
  const rejected = once(h.handler, 'rejected').then(([r]) => r as { code: string });
  // --memfd after --template: the fixture maps the template, but sends its own memfd too.
  const child = spawn(buildFixture('vmm'), ['--socket', h.socket, '--image', h.imagePath, '--memfd'], { stdio: ['ignore', 'ignore', 'ignore'] });
  t.teardown(() => child.kill('SIGKILL'));
  t.match(await rejected, { code: 'ERR_PROTOCOL_MALFORMED' }, 'a VMM that is not a clone is turned away with a clear code');
});

t.test('postcopy handle --template: clones through the CLI', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(1024, 5));
  const socket = join(dir, 'handler.sock');
  const [cmd, ...pre] = cliCommand();
  const handler = spawn(cmd, [...pre, 'handle', '--socket', socket, '--image', imagePath, '--template', 'cli', '--log-level', 'warn'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  t.teardown(() => handler.kill('SIGTERM'));
  const lines = createInterface({ input: handler.stdout! })[Symbol.asyncIterator]();
  t.ok(JSON.parse((await lines.next()).value).listening);
  for (const seed of [1, 2]) {
    const clone = await startClone(socket, imagePath, ['--threads', '2', '--seed', String(seed)]);
    t.match(clone.report, { ok: true, pages: 1024, mismatchedPages: 0 });
    t.equal(await clone.release(), 0);
    const summary = JSON.parse((await lines.next()).value) as VmmSessionSummary;
    t.equal(summary.complete, true);
    t.match(summary.installedCheck, { result: 'match' });
  }
});

/** Template mode over a `postcopy serve` process (killed by the test), faults one page at a time. */
async function templateOverServe(t: Test, giveUpAfterMs?: number) {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(8192, 6));
  const source = `unix:${join(dir, 'src.sock')}`;
  const serve = await startServeCli(t, ['--image', imagePath, '--listen', source]);
  const handler = new VmmHandler({
    source,
    template: 'golden',
    recovery: { ...FAST_RECOVERY, ...(giveUpAfterMs ? { giveUpAfterMs } : {}) },
    background: { enabled: false },
    window: { forward: 0, backward: 0 },
  });
  const socket = join(dir, 'handler.sock');
  await handler.listen(socket);
  t.teardown(() => handler.close());
  const clone = (seed: number) => {
    const child = spawn(buildFixture('vmm'), ['--socket', socket, '--image', imagePath, '--template', '--threads', '2', '--seed', String(seed)], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    t.teardown(() => void child.kill('SIGKILL'));
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    return once(child, 'close').then(([code, signal]) => ({ code: code as number | null, signal: signal as string | null, out }));
  };
  return { handler, serve, source, imagePath, clone };
}

t.test("the template's source is killed (-9) mid-fill and restarted: its clones only pause, and verify every byte", async (t) => {
  const h = await templateOverServe(t);
  const ended: VmmSessionSummary[] = [];
  h.handler.on('session-end', (s: VmmSessionSummary) => ended.push(s));
  const started = once(h.handler, 'session-start');
  const clones = [h.clone(1), h.clone(2)];
  await started;
  h.serve.child.kill('SIGKILL');
  await once(h.serve.child, 'close');
  await startServeCli(t, ['--image', h.imagePath, '--listen', h.source]);
  for (const result of await Promise.all(clones)) {
    t.equal(result.signal, null);
    t.equal(result.code, 0, 'the clone verified every byte');
    t.match(JSON.parse(result.out.trim().split('\n')[0]), { ok: true, mismatchedPages: 0 });
  }
  await waitFor(() => ended.length === 2);
  for (const s of ended) t.equal(s.poisonedPages, 0);
});

t.test("with a give-up time, a template whose source never comes back poisons its clones' missing pages: SIGBUS, not a hang", async (t) => {
  const h = await templateOverServe(t, 300);
  const started = once(h.handler, 'session-start');
  const clones = [h.clone(1), h.clone(2)];
  await started;
  h.serve.child.kill('SIGKILL');
  for (const result of await Promise.all(clones)) t.equal(result.signal, 'SIGBUS', 'the clone touched a poisoned page');
  // The next VMM is offered a new template, which tries the source again (and, with none there, is refused).
  const rejected = once(h.handler, 'rejected').then(([r]) => r as { code: string });
  const late = await h.clone(3);
  t.not(late.code, 0, 'a VMM arriving later is turned away, not left waiting');
  t.ok((await rejected).code, `with a clear code (${(await rejected).code})`);
});

async function waitFor(done: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !done(); i++) await new Promise((r) => setTimeout(r, 10));
  if (!done()) throw new Error('timed out');
}

for (const from of ['source', 'image'] as const) {
  t.test(
    `a plain VMM (it does not map the template it is offered) is refused with ERR_TEMPLATE_NOT_MAPPED and gets SIGBUS, never a hang (${from}); clones still restore`,
    async (t) => {
      const h = await templateHandler(t, from, true);
      const rejected = once(h.handler, 'rejected').then(([r]) => r as { code: string; message: string; poisonedBytes?: number });
      const plain = spawn(buildFixture('vmm'), ['--socket', h.socket, '--image', h.imagePath, '--threads', '2'], { stdio: ['ignore', 'pipe', 'inherit'] });
      t.teardown(() => {
        plain.kill('SIGKILL');
      });
      const [, signal] = await once(plain, 'close');
      const r = await rejected;
      t.equal(r.code, 'ERR_TEMPLATE_NOT_MAPPED', 'refused with the reason');
      t.match(r.message, /does not map the template's memory it was offered/);
      t.equal(r.poisonedBytes, PAGES * PAGE, 'its whole guest memory was poisoned');
      t.equal(signal, 'SIGBUS', 'the plain VMM touched poisoned memory instead of waiting forever');
      const clone = await startClone(h.socket, h.imagePath, ['--threads', '2']);
      t.match(clone.report, { ok: true, mismatchedPages: 0 }, 'a clone after it restores every byte');
      await clone.release();
    },
  );
}
