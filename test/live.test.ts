// Live migration: a workload that keeps writing its memory (the VMM fixture
// in source mode) moves to a destination with precopy rounds (dirty pages
// found with userfaultfd WP_ASYNC and PAGEMAP_SCAN), a switchover and
// postcopy. The destination's memory at the end must equal the workload's at
// its pause, byte for byte: the fixture dumps it then, the restore writes its
// own out. Real processes, a real userfaultfd, real sockets.
import t from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { LINKS, namespaceLink } from '../bench/links.js';
import { native } from '../lib/native.js';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { LiveMigration, LiveWorkload, type LiveOptions, type LiveReport } from '../server/live.js';
import { PageServer } from '../server/page-server.js';
import { buildFixture, cliCommand, randomImage, runCli, spawnCli, tempDir, writeImage, until } from './helpers.js';
import { FaultProxy } from './fault-proxy.js';
import type { Test } from 'tap';

interface Workload {
  closed: Promise<{ code: number | null; lines: Record<string, unknown>[] }>;
  /** What it printed so far, one object a line (paused, sourceGone, reconnected, resumed, migrated, ...: each with its writes). */
  lines: Record<string, unknown>[];
  kill(): void;
}

/** The fixture in source mode, writing `rate` pages a second (a tenth of them anywhere, the rest in the hot set). */
function startWorkload(t: Test, socket: string, imagePath: string, dump: string, rate: number, seed = 1, exitAfterMs = 30000): Workload {
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
      String(exitAfterMs),
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  t.teardown(() => void child.kill('SIGKILL'));
  const lines: Record<string, unknown>[] = [];
  createInterface({ input: child.stdout }).on('line', (l) => lines.push(JSON.parse(l)));
  return { closed: once(child, 'close').then(([code]) => ({ code: code as number | null, lines })), lines, kill: () => child.kill('SIGKILL') };
}

/** A live source in this process for a workload started by the test. */
async function liveSource(t: Test, options: LiveOptions, rate: number, pages = 4096, seed = 1, across?: { listen: string; token: string; image: Buffer }) {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, across?.image ?? randomImage(pages, 11));
  const dump = join(dir, 'paused.mem');
  const accepting = LiveWorkload.accept(join(dir, 'workload.sock'));
  const workload = startWorkload(t, join(dir, 'workload.sock'), imagePath, dump, rate, seed);
  const live = new LiveMigration(await accepting, options);
  const server = new PageServer({ image: live.workload.image, live, ...(across ? { token: across.token } : {}) });
  const at = await server.listen(across?.listen ?? `unix:${join(dir, 'source.sock')}`);
  const source = at.kind === 'tcp' ? `tcp:${at.host}:${at.port}` : `unix:${join(dir, 'source.sock')}`;
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

t.test('a live source across a 1 Gbit/s link (paced, packed, sealed): precopy rounds, switchover, postcopy, byte-exact', async (t) => {
  const link = namespaceLink(LINKS.find((l) => l.name === 'veth-1g')!);
  if ('skipped' in link) {
    t.comment(`skipped: ${link.skipped}`);
    return;
  }
  t.teardown(() => link.remove());
  // Half the pages text-like (they pack), half random (they do not).
  const pages = 4096;
  const image = randomImage(pages);
  for (let p = 0; p < pages; p += 2) image.write(`page ${p} `.repeat(512).slice(0, 4096), p * 4096, 'latin1');
  const token = randomBytes(16).toString('hex');
  const s = await liveSource(t, { downtimeLimitMs: 20, maxPrecopyRounds: 8 }, 2000, pages, 4, { listen: `tcp:${link.hostAddress}:0`, token, image });
  const tokenFile = join(s.dir, 'token');
  writeFileSync(tokenFile, token, { mode: 0o600 });
  const out = join(s.dir, 'restored.mem');
  // The restore runs inside the namespace, across the shaped pair.
  const restore = await runCli(['restore', '--source', s.source, '--token-file', tokenFile, '--json', '--out', out, '--workload', 'random'], {}, undefined, [
    'ip',
    'netns',
    'exec',
    link.ns,
  ]);
  t.equal(restore.code, 0, restore.code === 0 ? 'restored' : restore.stderr);
  const report = JSON.parse(restore.stdout.trim().split('\n').pop()!);
  t.equal(report.digestMatch, true, "the destination equals the source's memory at its pause");
  t.ok(report.precopy.pagesPrecopied >= pages, `every page went in precopy first (${report.precopy.pagesPrecopied})`);
  t.ok(report.source.backgroundPacing, 'the source paced its bulk channel');
  if (native.packingAvailable()) t.ok(report.source.packedRuns > 0, `${report.source.packedRuns} runs went packed`);
  await s.report;
  await s.workload.closed;
  t.ok(readFileSync(out).equals(readFileSync(s.dump)), 'byte for byte the memory the workload held when it paused');
});

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
  t.ok(report.pagesOnDemand + report.pagesWindow + report.pagesBackground >= live.pagesDiscarded, 'and they came again after the switchover');
  await s.workload.closed;
  t.ok(readFileSync(out).equals(readFileSync(s.dump)), 'no page is stale');
});

t.test(
  'many pages stale at the switchover: dropped at the destination in discard rounds while the workload still runs, the rest in the pause; never stale',
  async (t) => {
    // One round of a writer hot enough that thousands of pages go stale while it is sent.
    const s = await liveSource(t, { maxPrecopyRounds: 1, downtimeLimitMs: 0 }, 200000, 16384, 8);
    const out = join(s.dir, 'restored.mem');
    const restore = await runCli(['restore', '--source', s.source, '--json', '--out', out, '--workload', 'random']);
    t.equal(restore.code, 0, restore.code === 0 ? 'restored' : restore.stderr);
    const report = JSON.parse(restore.stdout.trim().split('\n').pop()!);
    const live = await s.report;
    t.ok(live.pagesDiscardedAhead > 0, `${live.pagesDiscardedAhead} pages dropped before the pause, while the workload ran`);
    t.ok(live.pagesDiscarded >= live.pagesDiscardedAhead, `${live.pagesDiscarded} in all`);
    t.equal(report.precopy.pagesDiscarded, live.pagesDiscarded, 'the destination dropped each of them');
    await s.workload.closed;
    t.ok(readFileSync(out).equals(readFileSync(s.dump)), 'no page is stale');
  },
);

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

t.test('the control channel lost past the switchover, before the destination says it runs: a resume serves the paused memory, byte-exact', async (t) => {
  // Found by the failure matrix (MATRIX_SEED=575850449, live | link-cut): the source aborted the migration, and reset every resume.
  const s = await liveSource(t, { mode: 'postcopy' }, 5000, 2048, 10);
  const proxy = await FaultProxy.start(t, s.source, join(s.dir, 'proxy.sock'));
  // The control channel (the first connection) is cut at the first byte it carries up once the workload paused: the
  // destination's `running`, which comes once the switchover marker reached it (the heartbeats are a second apart).
  s.live.workload.once('workload:paused', () => proxy.inject({ connection: 0, direction: 'up', afterBytes: proxy.carried(0, 'up'), action: 'fin' }));
  const aborted = new Promise((resolve) => s.live.once('aborted', resolve));
  const out = join(s.dir, 'restored.mem');
  const restore = await settled(
    'the restore to end',
    spawnCli(t, ['restore', '--source', proxy.address, '--json', '--out', out, '--workload', 'random', '--silence-timeout', '1s', '--give-up-after', '20s'])
      .exited,
  );
  t.equal(proxy.fired.length, 1, 'the control channel was cut');
  t.equal(restore.code, 0, restore.stderr);
  const report = JSON.parse(restore.stdout.trim().split('\n').pop()!);
  t.ok(report.recovery.resumes >= 1, `the destination resumed (${report.recovery.resumes} resume(s))`);
  t.equal(report.digestMatch, true);
  t.match(await settled('the live report', s.report), { mode: 'postcopy' }, 'the live source saw the destination run');
  t.equal(await Promise.race([aborted.then(() => true), Promise.resolve(false)]), false, 'the migration was never aborted');
  const { code, lines } = await settled('the workload to exit', s.workload.closed);
  t.equal(code, 0, 'the workload was told it migrated');
  t.notOk(
    lines.some((l) => l.resumed),
    'it was never told to resume at the source',
  );
  t.ok(readFileSync(out).equals(readFileSync(s.dump)), 'byte for byte the memory the workload held when it paused');
});

t.test('a live source whose workload is gone refuses a destination with a final code (ERR_WORKLOAD_GONE)', async (t) => {
  const s = await liveSource(t, {}, 1000, 1024, 11);
  const gone = once(s.live.workload, 'gone');
  s.workload.kill();
  await settled('the workload to be gone', gone);
  const restore = await settled('the restore to end', spawnCli(t, ['restore', '--source', s.source, '--json', '--workload', 'none']).exited);
  t.equal(restore.code, 1, 'refused');
  t.match(restore.stderr, /ERR_WORKLOAD_GONE/);
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

/** What `promise` settles to, or a failure naming `what` once `timeoutMs` has passed. */
async function settled<T>(what: string, promise: Promise<T>, timeoutMs = 60_000): Promise<T> {
  let outcome: { value: T } | { error: unknown } | undefined;
  promise.then(
    (value) => (outcome = { value }),
    (error: unknown) => (outcome = { error }),
  );
  const done = await until(what, () => outcome, timeoutMs);
  if ('error' in done) throw done.error;
  return done.value;
}

/** `postcopy serve --live ...args` in its own process: its JSON lines one by one, its exit, a kill -9. */
function startServeLive(t: Test, args: string[]) {
  const [cmd, ...pre] = cliCommand();
  const child: ChildProcess = spawn(cmd, [...pre, 'serve', '--live', ...args, '--log-level', 'warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => void child.kill('SIGKILL'));
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const closed = once(child, 'close').then(([code]) => ({ code: code as number | null, stderr }));
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  return {
    closed,
    /** Its next JSON line (bounded: it exiting first fails the wait, naming what it said). */
    async next(): Promise<Record<string, unknown>> {
      const line = await settled(
        'a line from serve --live',
        Promise.race([
          lines.next(),
          closed.then(({ code }) => {
            throw new Error(`serve --live exited with ${code}: ${stderr}`);
          }),
        ]),
      );
      return JSON.parse(line.value as string);
    },
    kill: () => child.kill('SIGKILL'),
  };
}

/** A workload handed to `serve --live` (a CLI process), and a restore from it that is slow enough (4 MB/s) to be killed under. */
async function liveMoveUnderway(t: Test, restoreArgs: string[]) {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(4096, 5));
  const workloadSocket = join(dir, 'workload.sock');
  const listen = `unix:${join(dir, 'source.sock')}`;
  const dump = join(dir, 'paused.mem');
  // Precopy is cut short after 300 ms: most of the 16 MiB moves after the switchover, in postcopy.
  const serveArgs = ['--socket', workloadSocket, '--listen', listen, '--postcopy-after', '300ms'];
  const serve = startServeLive(t, serveArgs);
  await until('the workload socket', () => existsSync(workloadSocket));
  const workload = startWorkload(t, workloadSocket, imagePath, dump, 3000, 12, 60000);
  t.ok(((await serve.next()).workload as number) > 0, 'serve --live holds the workload');
  const out = join(dir, 'restored.mem');
  const [cmd, ...pre] = cliCommand();
  const child = spawn(cmd, [...pre, 'restore', '--source', listen, '--json', '--out', out, '--rate', '4M', '--workload', 'random', ...restoreArgs], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  t.teardown(() => void child.kill('SIGKILL'));
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d) => (stdout += d));
  child.stderr!.on('data', (d) => (stderr += d));
  const restore = once(child, 'close').then(([code]) => ({ code: code as number | null, stdout, stderr }));
  // Its live report comes once the destination says its workload runs: the switchover is behind us.
  const { live } = (await serve.next()) as { live: LiveReport };
  t.equal(live.switchoverBy, 'postcopy-after', 'the switchover came, with most pages still to move');
  serve.kill();
  await settled('the killed serve --live to close', serve.closed);
  // The workload notices; paused for the migration, it writes nothing more and waits for a source to hand itself to.
  const gone = await until('the workload to see its source gone', () => workload.lines.find((l) => l.sourceGone));
  const paused = workload.lines.find((l) => l.paused === true && Object.keys(l).length === 2) as { writes: number };
  t.equal(gone.paused, true, 'the workload saw its source die while paused');
  t.equal(gone.writes, paused.writes, `and had written nothing since its pause (${paused.writes} writes)`);
  return { dir, serveArgs, listen, dump, out, workload, restore, paused, migration: live.migration };
}

t.test(
  'serve --live killed right after the switchover: the workload stays paused, a restarted serve --live re-adopts it, the destination resumes byte-exact',
  async (t) => {
    const m = await liveMoveUnderway(t, []);
    const again = startServeLive(t, m.serveArgs);
    const listening = await again.next();
    t.equal(listening.readopted, m.migration, 'the restarted source re-adopts the paused workload, naming its migration');
    const restore = await settled('the restore to end', m.restore);
    t.equal(restore.code, 0, restore.stderr);
    const report = JSON.parse(restore.stdout.trim().split('\n').pop()!);
    t.ok(report.recovery.resumes >= 1, `the destination paused and resumed (${report.recovery.resumes} resume(s), ${report.recovery.pausedMs} ms paused)`);
    t.equal(report.digestMatch, true, "the destination equals the workload's memory at its pause");
    t.equal(
      (await settled('the restarted serve --live to exit', again.closed)).code,
      0,
      'the restarted serve --live exits once the destination holds every page',
    );
    const { code, lines } = await settled('the workload to exit', m.workload.closed);
    t.equal(code, 0, 'the workload was told it migrated');
    const writes = lines.filter((l) => 'writes' in l).map((l) => Object.keys(l)[0] + ' ' + String(l.writes));
    t.ok(
      lines.filter((l) => l.reconnected || l.migrated).every((l) => l.writes === m.paused.writes) && lines.some((l) => l.reconnected),
      `not one write at the source after the switchover (${writes.join(', ')})`,
    );
    t.notOk(
      lines.some((l) => l.resumed),
      'it was never told to resume',
    );
    t.ok(readFileSync(m.out).equals(readFileSync(m.dump)), 'byte for byte the memory the workload held when it paused');
  },
);

t.test('the destination gives up after the switchover and says so: only then, told so, does the workload run again at the source', async (t) => {
  const m = await liveMoveUnderway(t, ['--give-up-after', '2s']);
  const restore = await settled('the restore to end', m.restore);
  t.equal(restore.code, 1, 'the destination gives up');
  t.match(restore.stderr, /ERR_SOURCE_LOST/);
  const said = /gives up live migration (live-[0-9a-f]{32}).*--resume-workload (live-[0-9a-f]{32})/.exec(restore.stderr);
  t.ok(said && said[1] === m.migration && said[2] === m.migration, 'it names the migration it gave up, and how the workload at the source resumes');
  t.notOk(existsSync(m.out), 'it wrote nothing');
  const id = said![1];
  t.notOk(
    m.workload.lines.some((l) => l.resumed || (typeof l.writes === 'number' && l.writes !== m.paused.writes)),
    'the workload stayed paused meanwhile',
  );

  // Another migration's name: refused, and the workload stays paused.
  const wrong = startServeLive(t, [...m.serveArgs, '--resume-workload', `live-${'0'.repeat(32)}`]);
  const refused = await settled('the refusing serve --live to exit', wrong.closed);
  t.equal(refused.code, 1);
  t.match(refused.stderr, /ERR_MIGRATION_MISMATCH/, 'a resume for another migration is refused');
  const refusedBy = await until('the workload to be let go by the refusing source', () => m.workload.lines.filter((l) => l.sourceGone)[1]);
  t.match(refusedBy, { paused: true, writes: m.paused.writes }, 'and the workload, handed over and let go, is still paused');

  // The destination's word, carried by the operator: the workload runs again here, and this source may move it again.
  const resumed = startServeLive(t, [...m.serveArgs, '--resume-workload', id]);
  t.match(await resumed.next(), { resumed: id, workload: Number });
  const back = await until('the workload to resume', () => m.workload.lines.find((l) => l.resumed));
  t.equal(back.writes, m.paused.writes, 'it resumes from where it paused');
  const out = join(m.dir, 'second.mem');
  const second = await settled('the second restore', runCli(['restore', '--source', m.listen, '--json', '--out', out, '--workload', 'none']));
  t.equal(second.code, 0, second.stderr);
  t.equal((await settled('serve --live to exit', resumed.closed)).code, 0);
  const { code, lines } = await settled('the workload to exit', m.workload.closed);
  t.equal(code, 0, 'moved at the second attempt');
  const migrated = lines.find((l) => l.migrated) as { writes: number };
  t.ok(migrated.writes > m.paused.writes, `it wrote again once resumed (${m.paused.writes}, then ${migrated.writes} writes)`);
  t.ok(readFileSync(out).equals(readFileSync(m.dump)), 'and the second destination is byte-exact with its second pause');
});
