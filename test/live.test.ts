// Live migration: a workload that keeps writing its memory (the VMM fixture
// in source mode) moves to a destination with precopy rounds (dirty pages
// found with userfaultfd WP_ASYNC and PAGEMAP_SCAN), a switchover and
// postcopy. The destination's memory at the end must equal the workload's at
// its pause, byte for byte: the fixture dumps it then, the restore writes its
// own out. Real processes, a real userfaultfd, real sockets.
import t from 'tap';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { LiveMigration, LiveWorkload, type LiveOptions, type LiveReport } from '../server/live.js';
import { PageServer } from '../server/page-server.js';
import { buildFixture, cliCommand, randomImage, runCli, tempDir, writeImage, until } from './helpers.js';
import type { Test } from 'tap';

interface Workload {
  closed: Promise<{ code: number | null; lines: Record<string, unknown>[] }>;
  kill(): void;
}

/** The fixture in source mode, writing `rate` pages a second (a tenth of them anywhere, the rest in the hot set). */
function startWorkload(t: Test, socket: string, imagePath: string, dump: string, rate: number, seed = 1): Workload {
  const child = spawn(
    buildFixture('vmm'),
    [
      '--live-source',
      socket,
      '--image',
      imagePath,
      '--write-rate',
      String(rate),
      '--hot-set',
      '10',
      '--threads',
      '2',
      '--seed',
      String(seed),
      '--dump',
      dump,
      '--exit-after-ms',
      '30000',
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  t.teardown(() => void child.kill('SIGKILL'));
  const lines: Record<string, unknown>[] = [];
  createInterface({ input: child.stdout }).on('line', (l) => lines.push(JSON.parse(l)));
  return { closed: once(child, 'close').then(([code]) => ({ code: code as number | null, lines })), kill: () => child.kill('SIGKILL') };
}

/** A live source in this process for a workload started by the test. */
async function liveSource(t: Test, options: LiveOptions, rate: number, pages = 4096, seed = 1) {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(pages, 11));
  const dump = join(dir, 'paused.mem');
  const accepting = LiveWorkload.accept(join(dir, 'workload.sock'));
  const workload = startWorkload(t, join(dir, 'workload.sock'), imagePath, dump, rate, seed);
  const live = new LiveMigration(await accepting, options);
  const server = new PageServer({ image: live.workload.image, live });
  const source = `unix:${join(dir, 'source.sock')}`;
  await server.listen(source);
  t.teardown(async () => {
    await server.close();
    live.workload.close();
  });
  const report = new Promise<LiveReport>((resolve) => live.once('report', resolve));
  report.catch(() => {});
  return { dir, imagePath, dump, workload, live, server, source, report };
}

for (const [rate, seed] of [
  [2000, 1],
  [8000, 2],
  [500, 3],
] as const) {
  t.test(`a workload writing ${rate} pages/s migrates byte-exact: precopy rounds, switchover, postcopy (seed ${seed})`, async (t) => {
    const s = await liveSource(t, { downtimeLimitMs: 20, maxPrecopyRounds: 8 }, rate, 4096, seed);
    const out = join(s.dir, 'restored.mem');
    const restore = await runCli(['restore', '--source', s.source, '--json', '--out', out, '--workload', 'random', '--seed', String(seed)]);
    t.equal(restore.code, 0, restore.stderr);
    const report = JSON.parse(restore.stdout.trim().split('\n').pop()!);
    t.equal(report.digestMatch, true, "the destination equals the source's memory at its pause");
    const live = await s.report;
    t.ok(live.rounds >= 1, `${live.rounds} precopy round(s): ${live.pagesPerRound.join(', ')} pages`);
    t.ok(report.precopy.pagesPrecopied >= 4096, `every page went in precopy first (${report.precopy.pagesPrecopied})`);
    const { code, lines } = await s.workload.closed;
    t.equal(code, 0, 'the workload was told it migrated');
    const paused = lines.find((l) => l.paused) as { writes: number };
    t.ok(paused.writes > 0, `the workload wrote ${paused.writes} times before its pause`);
    t.ok(readFileSync(out).equals(readFileSync(s.dump)), 'byte for byte the memory the workload held when it paused');
  });
}

t.test('pages written in the last round are discarded at the destination and fetched again, never stale', async (t) => {
  // One round (max-precopy-rounds 1) of a fast writer: most of the hot set is written after it was sent.
  const s = await liveSource(t, { maxPrecopyRounds: 1, downtimeLimitMs: 0 }, 20000, 4096, 7);
  const out = join(s.dir, 'restored.mem');
  const restore = await runCli(['restore', '--source', s.source, '--json', '--out', out, '--workload', 'random']);
  t.equal(restore.code, 0, restore.stderr);
  const report = JSON.parse(restore.stdout.trim().split('\n').pop()!);
  const live = await s.report;
  t.equal(live.switchoverBy, 'max-rounds');
  t.ok(live.pagesDiscarded > 0, `${live.pagesDiscarded} pages discarded at the switchover`);
  t.equal(report.precopy.pagesDiscarded, live.pagesDiscarded, 'the destination dropped each of them');
  t.ok(report.pagesOnDemand + report.pagesPrefaulted + report.pagesBackground >= live.pagesDiscarded, 'and they came again after the switchover');
  await s.workload.closed;
  t.ok(readFileSync(out).equals(readFileSync(s.dump)), 'no page is stale');
});

t.test('switchover on request, and pure postcopy: byte-exact both', async (t) => {
  const s = await liveSource(t, { maxPrecopyRounds: 100000, downtimeLimitMs: 0, maxStalledRounds: 0 }, 20000, 2048, 4);
  const out = join(s.dir, 'restored.mem');
  // A slow link (--rate): the first round alone takes 2 s; the request cuts it short.
  const restore = runCli(['restore', '--source', s.source, '--json', '--out', out, '--workload', 'none', '--rate', '4M']);
  await until('the live source to leave waiting', () => s.live.state !== 'waiting');
  await new Promise((r) => setTimeout(r, 300));
  s.live.requestSwitchover();
  t.equal((await restore).code, 0);
  const report = await s.report;
  t.equal(report.switchoverBy, 'request');
  t.equal(report.rounds, 1, 'mid-way through the first round');
  await s.workload.closed;
  t.ok(readFileSync(out).equals(readFileSync(s.dump)), 'on request: byte-exact');

  const p = await liveSource(t, { mode: 'postcopy' }, 5000, 2048, 5);
  const out2 = join(p.dir, 'restored.mem');
  const r2 = await runCli(['restore', '--source', p.source, '--json', '--out', out2]);
  t.equal(r2.code, 0);
  t.match(await p.report, { mode: 'postcopy', rounds: 0, pagesDiscarded: 0 });
  await p.workload.closed;
  t.ok(readFileSync(out2).equals(readFileSync(p.dump)), 'pure postcopy: byte-exact');
});

t.test('a workload that dirties faster than the link converges by switching to postcopy, not looping forever', async (t) => {
  // The link: a 4 MB/s background rate (--rate at the destination); the workload writes 40 MB/s.
  const s = await liveSource(t, { downtimeLimitMs: 10, maxPrecopyRounds: 4 }, 10000, 2048, 6);
  const out = join(s.dir, 'restored.mem');
  const restore = await runCli(['restore', '--source', s.source, '--json', '--out', out, '--rate', '4M', '--workload', 'random']);
  t.equal(restore.code, 0, restore.stderr);
  const live = await s.report;
  t.ok(['max-rounds', 'no-progress'].includes(live.switchoverBy), `switched over by ${live.switchoverBy} after ${live.rounds} rounds`);
  await s.workload.closed;
  t.ok(readFileSync(out).equals(readFileSync(s.dump)), 'and byte-exact');
});

t.test('a workload that exits mid-precopy ends the session with a clear error; nothing hangs', async (t) => {
  const s = await liveSource(t, { maxPrecopyRounds: 100000, downtimeLimitMs: 0, maxStalledRounds: 0 }, 20000, 4096, 8);
  const aborted = once(s.live, 'aborted').then(([e]) => e as { code: string });
  const restore = runCli(['restore', '--source', s.source, '--json', '--workload', 'none', '--rate', '4M']);
  await until('precopy', () => s.live.state === 'precopy');
  await new Promise((r) => setTimeout(r, 200));
  s.workload.kill();
  const result = await restore;
  t.not(result.code, 0, 'the restore fails');
  t.match(result.stderr, /ERR_WORKLOAD_GONE/, 'with the code that says why');
  t.equal((await aborted).code, 'ERR_WORKLOAD_GONE');
});

t.test('the destination leaving mid-precopy: the workload goes on at the source, unpaused', async (t) => {
  const s = await liveSource(t, { maxPrecopyRounds: 100000, downtimeLimitMs: 0, maxStalledRounds: 0 }, 5000, 2048, 9);
  const aborted = once(s.live, 'aborted');
  const [cmd, ...pre] = cliCommand();
  const restore = spawn(cmd, [...pre, 'restore', '--source', s.source, '--workload', 'none', '--rate', '4M'], { stdio: 'ignore' });
  await until('precopy', () => s.live.state === 'precopy');
  restore.kill('SIGKILL');
  await aborted;
  t.equal(s.live.state, 'aborted');
  t.equal(s.live.workload.gone, false, 'the workload is still running');
});

t.test('postcopy serve --live: the CLI waits for the workload, moves it to a restore, reports, and exits', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(2048, 5));
  const workloadSocket = join(dir, 'workload.sock');
  const dump = join(dir, 'paused.mem');
  const [cmd, ...pre] = cliCommand();
  const serve = spawn(
    cmd,
    [...pre, 'serve', '--live', '--socket', workloadSocket, '--listen', `unix:${join(dir, 'source.sock')}`, '--max-precopy-rounds', '3', '--log-level', 'warn'],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  t.teardown(() => void serve.kill('SIGKILL'));
  const served = once(serve, 'close');
  const lines = createInterface({ input: serve.stdout! })[Symbol.asyncIterator]();
  await until('the workload socket', () => existsSync(workloadSocket));
  const workload = startWorkload(t, workloadSocket, imagePath, dump, 3000);
  const listening = JSON.parse((await lines.next()).value) as { listening: { path: string }; workload: number };
  t.ok(listening.workload > 0, 'it names the workload it holds');
  const out = join(dir, 'restored.mem');
  const restore = await runCli(['restore', '--source', `unix:${listening.listening.path}`, '--json', '--out', out]);
  t.equal(restore.code, 0, restore.stderr);
  const { live } = JSON.parse((await lines.next()).value) as { live: LiveReport };
  t.match(live, { mode: 'precopy+postcopy', rounds: Number, pauseMs: Number });
  t.ok(live.rounds <= 3);
  t.equal((await served)[0], 0, 'serve exits once the destination holds every page');
  t.equal((await workload.closed).code, 0);
  t.ok(readFileSync(out).equals(readFileSync(dump)), 'byte-exact');
});
