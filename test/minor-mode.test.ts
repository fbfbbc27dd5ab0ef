// MINOR mode: a VMM whose guest memory is a memfd mapped shared (QEMU's
// memory-backend-memfd,share=on) sends the memfd with its userfaultfd. The
// handler puts page contents into that file's page cache through its own
// mapping and releases the guest's threads with UFFDIO_CONTINUE: a fault on a
// page already cached copies nothing. Real memfds, the real VMM fixture.
import t from 'tap';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import type { VmmSessionSummary } from '../client/vmm-handler.js';
import { createInterface } from 'node:readline';
import { buildFixture, cliCommand, handlerOverImage, randomImage, tempDir, writeImage } from './helpers.js';

async function runMemfdVmm(socket: string, imagePath: string, extra: string[]) {
  const child = spawn(buildFixture('vmm'), ['--socket', socket, '--image', imagePath, '--memfd', ...extra], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const [code] = await once(child, 'close');
  return { code, report: JSON.parse(out.trim() || '{}') };
}

for (const from of ['image', 'source'] as const) {
  t.test(`${from}: every page lands in the guest's memory file first, and each fault only maps it (UFFDIO_CONTINUE)`, async (t) => {
    const h = await handlerOverImage(t, randomImage(2048, 7), from, true);
    const ended = once(h.handler, 'session-end').then(([s]) => s as VmmSessionSummary);
    const checked = once(h.handler, 'installed-check').then(([c]) => c as { result: string });
    // The guest starts once its memory could all be in the page cache (the background fill is unhurried).
    const { code, report } = await runMemfdVmm(h.socket, h.imagePath, ['--threads', '4', '--order', 'random', '--start-after-ms', '1000']);
    t.equal(code, 0, 'the VMM verified every byte');
    t.match(report, { ok: true, pages: 2048, mismatchedPages: 0 });
    const summary = await ended;
    t.equal(summary.complete, true);
    t.equal(summary.minorFaults, 2048, 'every touch was a minor fault on a cached page');
    t.equal(summary.pagesOnDemand, 0, 'no page waited for its contents');
    t.equal((await checked).result, 'match', 'what went into the page cache matches the image');
  });

  t.test(`${from}: with no background, each fault puts its page in the memory file and maps it; byte-exact`, async (t) => {
    const h = await handlerOverImage(t, randomImage(2048, 7), from, false);
    const ended = once(h.handler, 'session-end').then(([s]) => s as VmmSessionSummary);
    const { code, report } = await runMemfdVmm(h.socket, h.imagePath, ['--threads', '4', '--order', 'random']);
    t.equal(code, 0, 'the VMM verified every byte');
    t.match(report, { ok: true, pages: 2048, mismatchedPages: 0 });
    const summary = await ended;
    t.equal(summary.complete, true);
    t.ok(summary.pagesOnDemand > 0, `pages came on demand (${summary.pagesOnDemand})`);
    t.equal(summary.pagesOnDemand + summary.pagesWindow, 2048, 'every page once, through a fault or its window');
  });
}

t.test('postcopy handle (supervisor and worker) hands the memory file over with the userfaultfd', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(1024, 5));
  const socket = join(dir, 'handler.sock');
  const [cmd, ...pre] = cliCommand();
  const handler = spawn(cmd, [...pre, 'handle', '--socket', socket, '--image', imagePath, '--log-level', 'warn'], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => handler.kill('SIGTERM'));
  const lines = createInterface({ input: handler.stdout! })[Symbol.asyncIterator]();
  t.ok(JSON.parse((await lines.next()).value).listening);
  const { code, report } = await runMemfdVmm(socket, imagePath, ['--threads', '2', '--start-after-ms', '200']);
  t.equal(code, 0, 'the VMM verified every byte');
  t.match(report, { ok: true, pages: 1024 });
  const summary = JSON.parse((await lines.next()).value) as VmmSessionSummary;
  t.equal(summary.complete, true);
  t.ok(summary.minorFaults > 0, `minor faults served by the worker (${summary.minorFaults})`);
});
