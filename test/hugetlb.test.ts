// 2 MiB huge-page guest memory (hugetlbfs) served from a 4 KiB-page image on
// this host or from a source: each fault installs one whole huge page, with UFFDIO_COPY
// (MISSING) or through the guest's hugetlbfs memfd and UFFDIO_CONTINUE
// (MINOR). The test reserves the huge pages it needs (vm.nr_hugepages) and
// gives them back at the end.
import t from 'tap';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import type { VmmSessionSummary } from '../client/vmm-handler.js';
import { buildFixture, handlerOverImage, randomImage, reserveHugePages } from './helpers.js';

const HUGE = 2 << 20;
const IMAGE_PAGES = 4096; // 16 MiB: 8 huge pages (every 700th page zero: a huge page is zero only if all of it is)

function runVmm(socket: string, imagePath: string, extra: string[], stdin: 'ignore' | 'pipe' = 'ignore') {
  const child = spawn(buildFixture('vmm'), ['--socket', socket, '--image', imagePath, '--hugetlb', ...extra], { stdio: [stdin, 'pipe', 'inherit'] });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  return { child, done: once(child, 'close').then(([code]) => ({ code: code as number | null, report: JSON.parse(out.trim() || '{}') })) };
}

t.test('huge pages (hugetlbfs)', async (t) => {
  if (!reserveHugePages(t, 16)) {
    t.plan(0, 'this machine cannot reserve 16 huge pages (vm.nr_hugepages)');
    return;
  }

  t.test('MISSING: each fault installs a whole 2 MiB page from the 4 KiB-page image; byte-exact', async (t) => {
    const h = await handlerOverImage(t, randomImage(IMAGE_PAGES, 700), 'image', false);
    const ended = once(h.handler, 'session-end').then(([s]) => s as VmmSessionSummary);
    const checked = once(h.handler, 'installed-check').then(([c]) => c as { result: string; checkedPages: number });
    // --hold: the VMM stays until the handler has checked what it installed.
    const vmm = runVmm(h.socket, h.imagePath, ['--threads', '2', '--order', 'random', '--hold'], 'pipe');
    const check = await checked;
    t.equal(check.result, 'match', `installed pages checked against the image, per 4 KiB page: ${JSON.stringify(check)}`);
    // (A page a window and a fault both tried to install is left out of the sum, never counted wrong.)
    t.ok(check.checkedPages > 0 && check.checkedPages % (HUGE / 4096) === 0, `whole huge pages checked (${check.checkedPages} 4 KiB pages)`);
    vmm.child.stdin!.end();
    const { code, report } = await vmm.done;
    t.equal(code, 0, 'the VMM verified every byte');
    t.match(report, { ok: true, pages: IMAGE_PAGES, mismatchedPages: 0 });
    const summary = await ended;
    t.equal(summary.complete, true);
    t.equal(summary.pages, IMAGE_PAGES / (HUGE / 4096), 'counted in huge pages');
    t.equal(summary.bytes, IMAGE_PAGES * 4096, 'bytes: each huge page counted whole (2 MiB, not 4 KiB)');
    t.equal(summary.pagesOnDemand + summary.pagesWindow, IMAGE_PAGES / (HUGE / 4096), 'every huge page came through a fault or its window');
  });

  t.test('MINOR: a hugetlbfs memfd filled ahead; each fault maps its cached huge page (UFFDIO_CONTINUE)', async (t) => {
    const h = await handlerOverImage(t, randomImage(IMAGE_PAGES, 700), 'image', true);
    const ended = once(h.handler, 'session-end').then(([s]) => s as VmmSessionSummary);
    const { code, report } = await runVmm(h.socket, h.imagePath, ['--memfd', '--threads', '1', '--start-after-ms', '1000']).done;
    t.equal(code, 0, 'the VMM verified every byte');
    t.match(report, { ok: true, pages: IMAGE_PAGES, mismatchedPages: 0 });
    const summary = await ended;
    t.equal(summary.complete, true);
    t.equal(summary.minorFaults, IMAGE_PAGES / (HUGE / 4096), 'every huge page was a minor fault on a cached page');
  });

  for (const background of [false, true]) {
    t.test(`from a source (background ${background ? 'on' : 'off'}): the source sends whole huge pages only; byte-exact`, async (t) => {
      const h = await handlerOverImage(t, randomImage(IMAGE_PAGES, 700), 'source', background);
      const ended = once(h.handler, 'session-end').then(([s]) => s as VmmSessionSummary);
      const { code, report } = await runVmm(h.socket, h.imagePath, ['--threads', '2', '--order', 'random']).done;
      t.equal(code, 0, 'the VMM verified every byte');
      t.match(report, { ok: true, pages: IMAGE_PAGES, mismatchedPages: 0 });
      const summary = await ended;
      t.equal(summary.complete, true);
      t.equal(summary.pages, IMAGE_PAGES / (HUGE / 4096));
    });
  }

  t.test('from a source into a hugetlbfs memfd (MINOR): whole huge pages into the page cache, then mapped', async (t) => {
    const h = await handlerOverImage(t, randomImage(IMAGE_PAGES, 700), 'source', true);
    const ended = once(h.handler, 'session-end').then(([s]) => s as VmmSessionSummary);
    const { code, report } = await runVmm(h.socket, h.imagePath, ['--memfd', '--threads', '1', '--start-after-ms', '1000']).done;
    t.equal(code, 0, 'the VMM verified every byte');
    t.match(report, { ok: true, pages: IMAGE_PAGES, mismatchedPages: 0 });
    const summary = await ended;
    t.equal(summary.minorFaults, IMAGE_PAGES / (HUGE / 4096), 'every huge page was a minor fault on a cached page');
  });
});
