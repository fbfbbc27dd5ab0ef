// Failures as features: links cut (FIN, RST) or silenced at random points on
// every channel, a source killed and restarted, a source serving another
// image, a source that never comes back. Each restore must end byte-exact
// without anyone stepping in, or fail cleanly when told to give up.
import t from 'tap';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { Image } from '../lib/image.js';
import { MAX_UNPROVEN_CONNECTIONS, PageServer } from '../server/page-server.js';
import { ADMISSION_LOG_INTERVAL_MS } from '../server/admission.js';
import { connect as netConnect, type Socket } from 'node:net';
import { Destination } from '../client/destination.js';
import type { DestinationSession } from '../client/session.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { encodeFrame } from '../lib/protocol.js';
import { FaultProxy } from './fault-proxy.js';
import { CUT_CASES, cutOffset, restoreThroughCut, seededRandom } from './cut-points.js';
import {
  FAST_HEARTBEAT,
  FAST_RECOVERY,
  PAGE,
  cliCommand,
  fakeServingSource,
  randomImage,
  spawnCli,
  startServeCli,
  tempDir,
  writeImage,
  until,
} from './helpers.js';
import type { Test } from 'tap';

const FAST = FAST_RECOVERY;
const SOURCE_HEARTBEAT = FAST_HEARTBEAT;

const seed = Number(process.env.RECOVERY_SEED ?? 20261125);
const random = seededRandom(seed);
t.comment(`cut points from RECOVERY_SEED=${seed}`);

async function serve(
  t: Test,
  image: Image,
  extra: Partial<ConstructorParameters<typeof PageServer>[0]> = {},
): Promise<{ server: PageServer; address: string }> {
  const server = new PageServer({ image, heartbeat: SOURCE_HEARTBEAT, ...extra });
  t.teardown(() => server.close());
  const a = await server.listen(`unix:${join(tempDir(t), 'source.sock')}`);
  return { server, address: `unix:${a.kind === 'unix' ? a.path : ''}` };
}

/** `postcopy restore ARGS` as a child: `started` once its transfer runs, `exited` with its output. */
function startRestoreCli(t: Test, args: string[]) {
  const restore = spawnCli(t, ['restore', ...args]);
  const started = new Promise<void>((resolve) => restore.child.stderr!.on('data', () => restore.output().stderr.includes('"transfer started"') && resolve()));
  return { started, exited: restore.exited };
}

const openFds = () => readdirSync('/proc/self/fd').length;
const threads = () => readdirSync('/proc/self/task').length;

/** Waits (bounded) until `check` holds. */
function eventually(check: () => boolean, what = 'the condition'): Promise<boolean> {
  return until(what, check);
}

t.test('random cut points on every channel: each restore ends byte-exact by itself', async (t) => {
  const pages = 1024;
  const bytes = randomImage(pages, 7);
  const fdsBefore = openFds();
  const threadsBefore = threads();
  let fired = 0;
  let resumes = 0;
  let cuts = 0;
  for (const c of [...CUT_CASES, ...CUT_CASES]) {
    const afterBytes = cutOffset(c, pages, random);
    await t.test(`${c.channel} ${c.direction} ${c.action} after ${afterBytes} bytes`, async (t) => {
      const { report, proxy, exact } = await restoreThroughCut(t, bytes, c, afterBytes, FAST, SOURCE_HEARTBEAT);
      t.ok(exact, 'every byte equals the source image');
      t.equal(report.digestMatch, true, 'the digests match');
      const recovery = report.recovery as { resumes: number; state: string };
      if (c.channel !== 'control') {
        t.equal(proxy.fired.length, 1, 'the fault hit mid-transfer');
        t.ok(recovery.resumes >= 1, `resumed (${recovery.resumes}x)`);
      }
      fired += proxy.fired.length;
      resumes += recovery.resumes;
      cuts++;
    });
  }
  t.comment(`${cuts} cut points, ${fired} faults fired, ${resumes} resumes`);
  // Sessions close at each subtest's teardown; their fds and threads must all be gone.
  await eventually(() => openFds() <= fdsBefore && threads() <= threadsBefore);
  t.pass(`no fd or thread left behind (${openFds()} fds, ${threads()} threads)`);
});

t.test('the same source holds a paused session and resumes it', async (t) => {
  const bytes = randomImage(512, 5);
  const server = new PageServer({ image: Image.open([{ buffer: bytes }]), heartbeat: SOURCE_HEARTBEAT, token: 'same source' });
  t.teardown(() => server.close());
  const a = await server.listen('tcp:127.0.0.1:0');
  const proxy = await FaultProxy.start(t, `tcp:127.0.0.1:${a.kind === 'tcp' ? a.port : 0}`);
  proxy.inject({ connection: 2, direction: 'down', afterBytes: 300 * PAGE, action: 'rst' });
  const dest = await Destination.connect({
    source: proxy.address,
    token: 'same source',
    recovery: FAST,
    background: { enabled: true, rateBytesPerSecond: 32 << 20 },
  });
  t.teardown(() => dest.close());
  const firstSession = dest.status().session;
  const report = await dest.finish();
  t.equal(report.digestMatch, true);
  t.equal(dest.status().session, firstSession, 'the same session id went on');
  const held = server.sessions.get(firstSession);
  t.ok(held && held.resumes >= 1, 'the source resumed its own paused session');
  t.equal(server.sessions.size, 1, 'no second session was opened');
});

t.test('a source that never comes back: with a give-up time the restore fails cleanly and the workload is released', async (t) => {
  const pages = 512;
  const bytes = randomImage(pages);
  const { server, address } = await serve(t, Image.open([{ buffer: bytes }]));
  const dest = await Destination.connect({
    source: address,
    recovery: { ...FAST, giveUpAfterMs: 500 },
    background: { enabled: false },
    window: { forward: 0, backward: 0 },
  });
  t.teardown(() => dest.close());
  const region = dest.regions[0].mapping;
  const states: string[] = [];
  dest.session.on('state', (s: string) => states.push(s));
  await touchPages(region.address, pages, Uint32Array.of(1, 2, 3), { mapping: region });
  await server.close(); // the source is gone for good
  const touching = touchPages(region.address, pages, shuffledOrder(pages, 3), { mapping: region });
  await t.rejects(dest.finish(), { code: 'ERR_SOURCE_LOST' });
  const touched = await touching; // released (reading zeros), never left blocked or touching unmapped memory
  t.equal(touched.firstBytes.length, pages);
  t.equal(dest.session.state, 'failed');
  t.ok(states.includes('paused') && states.includes('resuming'), `it tried before giving up (${[...new Set(states)].join(', ')})`);
  dest.close();
  t.equal(region.mapped, false, 'unmapped once the workload let go');
});

t.test('a source serving another image is refused, never mixed in; the right one is resumed', async (t) => {
  const dir = tempDir(t);
  const path = `unix:${join(dir, 'source.sock')}`;
  const bytes = randomImage(512, 9);
  const other = randomImage(512, 9); // same size and layout, other content (another snapshot)
  const first = new PageServer({ image: Image.open([{ buffer: bytes }]), heartbeat: SOURCE_HEARTBEAT });
  await first.listen(path);
  t.teardown(() => first.close());
  const dest = await Destination.connect({ source: path, recovery: FAST, background: { enabled: false }, window: { forward: 0, backward: 0 } });
  t.teardown(() => dest.close());
  const region = dest.regions[0].mapping;
  await touchPages(region.address, 512, Uint32Array.of(0, 1, 2), { mapping: region });
  await first.close();
  const impostor = new PageServer({ image: Image.open([{ buffer: other }]), heartbeat: SOURCE_HEARTBEAT });
  await impostor.listen(path);
  t.teardown(() => impostor.close());
  await eventually(() => dest.status().lastError?.code === 'ERR_IMAGE_MISMATCH');
  t.equal(dest.session.state === 'paused' || dest.session.state === 'resuming', true, 'still waiting for the right source');
  await impostor.close();
  const right = new PageServer({ image: Image.open([{ buffer: bytes }]), heartbeat: SOURCE_HEARTBEAT });
  await right.listen(path);
  t.teardown(() => right.close());
  const [report] = await Promise.all([dest.finish(), touchPages(region.address, 512, shuffledOrder(512, 5), { mapping: region })]);
  t.equal(report.digestMatch, true);
  t.ok(region.buffer().equals(bytes), 'byte-exact: nothing from the impostor');
});

t.test('a redirect points the resume at a source that moved', async (t) => {
  const bytes = randomImage(256);
  const a = await serve(t, Image.open([{ buffer: bytes }]));
  const dest = await Destination.connect({ source: a.address, recovery: FAST, background: { enabled: false } });
  t.teardown(() => dest.close());
  await a.server.close();
  const b = await serve(t, Image.open([{ buffer: bytes }]));
  (dest.session as DestinationSession).redirect(b.address);
  const region = dest.regions[0].mapping;
  const [report] = await Promise.all([dest.finish(), touchPages(region.address, 256, shuffledOrder(256, 2), { mapping: region })]);
  t.equal(report.digestMatch, true);
  t.equal(dest.status().source, b.address);
});

t.test('restore CLI: the source is killed (-9) mid-run and restarted from the same image; the restore completes byte-exact', async (t) => {
  // On the old main this crashed with SIGSEGV (exit 139) and never wrote --out.
  const dir = tempDir(t);
  const pages = 16384;
  const image = randomImage(pages, 11);
  const imagePath = writeImage(dir, image);
  const socket = `unix:${join(dir, 'src.sock')}`;
  const first = await startServeCli(t, ['--image', imagePath, '--listen', socket]);
  const out = join(dir, 'restored.bin');
  // Pure on demand, one page per fault: the workload outlives the kill for sure.
  const restore = startRestoreCli(t, [
    '--source',
    socket,
    '--no-background',
    '--window',
    '0:0',
    '--workload',
    'random',
    '--out',
    out,
    '--json',
    '--silence-timeout',
    '500ms',
  ]);
  await restore.started;
  first.child.kill('SIGKILL');
  await once(first.child, 'close');
  await startServeCli(t, ['--image', imagePath, '--listen', socket]);
  const { code, signal, stdout, stderr } = await restore.exited;
  t.equal(signal, null, 'no crash');
  t.equal(
    code,
    0,
    stderr
      .split('\n')
      .filter((l) => l.includes('"level":50'))
      .join('\n'),
  );
  const report = JSON.parse(stdout);
  t.equal(report.digestMatch, true);
  t.ok(report.recovery.resumes >= 1, `resumed after the restart (${report.recovery.resumes}x, paused ${report.recovery.pausedMs} ms)`);
  t.ok(readFileSync(out).equals(image), '--out holds the image');
  const logs = stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l));
  t.ok(
    logs.some((l) => l.msg === 'destination state' && l.state === 'paused'),
    'the pause is logged as a state change',
  );
  t.ok(
    logs.some((l) => typeof l.msg === 'string' && l.msg.startsWith('resumed after')),
    'and the resume',
  );
});

t.test('restore CLI: with --give-up-after, a source that never comes back fails the restore with ERR_SOURCE_LOST, no crash, no --out', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(16384));
  const socket = `unix:${join(dir, 'src.sock')}`;
  const source = await startServeCli(t, ['--image', imagePath, '--listen', socket]);
  const out = join(dir, 'restored.bin');
  const restore = startRestoreCli(t, ['--source', socket, '--no-background', '--window', '0:0', '--out', out, '--give-up-after', '300ms']);
  await restore.started;
  source.child.kill('SIGKILL');
  const { code, signal, stderr } = await restore.exited;
  t.equal(signal, null, 'no crash');
  t.equal(code, 1);
  t.match(stderr, /ERR_SOURCE_LOST/);
  t.notOk(existsSync(out), 'nothing half-restored was written');
});

t.test('a resume whose held-pages bitmap is larger than a control frame sends it in pieces, and resumes', async (t) => {
  // 1 Mi pages of hole (4 GiB, nothing allocated) and a source that takes 64 KiB frames: the 128 KiB bitmap cannot go whole.
  const dir = tempDir(t);
  const path = join(dir, 'sparse.img');
  const fd = openSync(path, 'w');
  ftruncateSync(fd, 4 * 2 ** 30);
  closeSync(fd);
  const server = new PageServer({ image: Image.open([{ path }]), token: 'pieces', maxFrame: 64 << 10, heartbeat: FAST_HEARTBEAT });
  t.teardown(() => server.close());
  const a = await server.listen('tcp:127.0.0.1:0');
  const proxy = await FaultProxy.start(t, `tcp:127.0.0.1:${a.kind === 'tcp' ? a.port : 0}`);
  const dest = await Destination.connect({
    source: proxy.address,
    token: 'pieces',
    recovery: { ...FAST_RECOVERY, giveUpAfterMs: 5000 },
    window: { forward: 0, backward: 0 },
    background: { enabled: false },
  });
  t.teardown(() => dest.close());
  const region = dest.regions[0].mapping;
  const pages = region.length / PAGE;
  const spread = (n: number, salt: number) => Uint32Array.from({ length: n }, (_, i) => Math.floor(((i + salt / 7) * pages) / n) % pages);
  await touchPages(region.address, pages, spread(64, 0), { mapping: region });
  // Resumed, or given up (as the resume fails every time when the bitmap cannot be sent): whichever comes first.
  const outcome = Promise.race([once(dest.session, 'resumed').then(() => 'resumed'), once(dest.session, 'failed').then(() => 'failed')]);
  proxy.breakAll('rst');
  t.equal(await outcome, 'resumed');
  t.equal(dest.session.status().resumes, 1, 'resumed once, with the bitmap in pieces');
  const after = await touchPages(region.address, pages, spread(64, 3), { mapping: region });
  t.equal(after.latencyNs.length, 64, 'and pages come again after it');
  t.ok(
    after.firstBytes.every((b) => b === 0),
    'holes read as zeros',
  );
});

t.test('replicas: when the source dies mid-restore, the restore resumes from a replica of the same image and ends byte-exact', async (t) => {
  const dir = tempDir(t);
  const pages = 2048;
  const bytes = randomImage(pages, 5);
  const primary = new PageServer({ image: Image.open([{ buffer: bytes }]), heartbeat: FAST_HEARTBEAT });
  const replica = new PageServer({ image: Image.open([{ buffer: Buffer.from(bytes) }]), heartbeat: FAST_HEARTBEAT });
  t.teardown(async () => {
    await primary.close();
    await replica.close();
  });
  await primary.listen(`unix:${join(dir, 'primary.sock')}`);
  await replica.listen(`unix:${join(dir, 'replica.sock')}`);
  const dest = await Destination.connect({
    source: `unix:${join(dir, 'primary.sock')}`,
    replicas: [`unix:${join(dir, 'replica.sock')}`],
    recovery: { ...FAST_RECOVERY, giveUpAfterMs: 10_000 },
    window: { forward: 0, backward: 0 },
    background: { enabled: false },
  });
  t.teardown(() => dest.close());
  const region = dest.regions[0].mapping;
  const order = shuffledOrder(pages, 9);
  await touchPages(region.address, pages, order.subarray(0, pages / 2), { mapping: region });
  const resumed = Promise.race([once(dest.session, 'resumed').then(() => 'resumed'), once(dest.session, 'failed').then(() => 'failed')]);
  await primary.close(); // the primary is gone for good
  t.equal(await resumed, 'resumed');
  t.equal(dest.session.status().source, `unix:${join(dir, 'replica.sock')}`, 'resumed from the replica');
  await touchPages(region.address, pages, order.subarray(pages / 2), { mapping: region });
  const report = await dest.finish();
  t.equal(report.digestMatch, true);
  t.ok(region.buffer().equals(bytes), 'every byte equals the image');
});

t.test('replicas: a first connection goes to the first that answers; restore --source A --source B works with A down', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(256, 3));
  const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 'replica.sock')}`]);
  const out = join(dir, 'out.bin');
  const [cmd, ...pre] = cliCommand();
  const child = spawn(
    cmd,
    [...pre, 'restore', '--source', `unix:${join(dir, 'nobody.sock')}`, '--source', `unix:${listening.path}`, '--workload', 'none', '--out', out, '--json'],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let stdout = '';
  child.stdout.on('data', (d) => (stdout += d));
  const [code] = await once(child, 'close');
  t.equal(code, 0);
  t.match(JSON.parse(stdout.trim()), { digestMatch: true, pages: 256 });
  t.ok(readFileSync(out).equals(readFileSync(imagePath)), 'the output equals the image');
});

t.test('a source serving a same-size image that differs where the fingerprint does not look is refused on resume: no page of it is installed', async (t) => {
  // On the old main the second image passed the sampled fingerprint and its pages were installed, mixed with the first's.
  const dir = tempDir(t);
  const pages = 1024;
  const right = randomImage(pages, 9);
  const other = Buffer.from(right);
  const differing = 1; // the fingerprint samples pages 0, 16, 32, ...: page 1 is not among them
  other.fill(0xa5, differing * PAGE, (differing + 1) * PAGE);
  const rightPath = writeImage(dir, right, 'right.img');
  const otherPath = writeImage(dir, other, 'other.img');
  const [a, b] = [Image.open([{ path: rightPath }]), Image.open([{ path: otherPath }])];
  t.equal(a.fingerprint, b.fingerprint, 'the sampled fingerprints cannot tell the two apart');
  a.close();
  b.close();
  const socket = `unix:${join(dir, 'src.sock')}`;
  const first = await startServeCli(t, ['--image', rightPath, '--listen', socket]);
  const dest = await Destination.connect({ source: socket, recovery: FAST, window: { forward: 0, backward: 0 }, background: { enabled: false } });
  t.teardown(() => dest.close());
  const region = dest.regions[0].mapping;
  await touchPages(
    region.address,
    pages,
    Uint32Array.from({ length: 16 }, (_, i) => i * 64),
    { mapping: region },
  );
  const paused = once(dest.session, 'paused');
  first.child.kill('SIGKILL');
  await paused;
  const before = dest.engine.stats();
  const impostor = await startServeCli(t, ['--image', otherPath, '--listen', socket]);
  await until('a resume refused with ERR_IMAGE_MISMATCH', () => dest.status().lastError?.code === 'ERR_IMAGE_MISMATCH');
  t.match(dest.status().lastError?.message, /content digest [0-9a-f]{16}, not [0-9a-f]{16}/, 'the message names both digests');
  const during = dest.engine.stats();
  t.equal(during.residentPages, before.residentPages, 'no page of the other image was installed');
  t.equal(during.bytesReceived, before.bytesReceived, 'not a byte of it was received');
  impostor.child.kill('SIGKILL');
  await once(impostor.child, 'close');
  await startServeCli(t, ['--image', rightPath, '--listen', socket]);
  await touchPages(region.address, pages, shuffledOrder(pages, 4), { mapping: region });
  const report = await dest.finish();
  t.equal(report.digestMatch, true, 'the right image resumes and ends byte-exact');
  t.ok(Buffer.from(region.buffer()).equals(right), 'every byte is the right image');
  t.ok(existsSync(`${rightPath}.postcopy-sums`), 'the digest was kept beside the image');
});
t.test(
  'a source failing at the digest stage (a malformed digest, none, an error) is given up on after --give-up-after; a mismatched digest is final at once',
  async (t) => {
    const image = randomImage(16, 3);
    for (const answer of ['malformed', 'silent', 'error', 'mismatch'] as const) {
      const source = await fakeServingSource(t, image, answer);
      const out = join(tempDir(t), 'restored.bin');
      const restore = startRestoreCli(t, [
        '--source',
        source.address,
        '--workload',
        'none',
        '--out',
        out,
        '--give-up-after',
        '2s',
        '--silence-timeout',
        '500ms',
      ]);
      let exited: Awaited<typeof restore.exited> | undefined;
      void restore.exited.then((r) => (exited = r));
      // Each resume reached "resident" and restarted the give-up clock: the restore paused and resumed every 100 ms, for ever.
      const { code, signal, stderr } = await until(`the restore against a source answering done with ${answer} to exit`, () => exited, 30_000);
      t.equal(signal, null, `${answer}: no crash`);
      t.equal(code, 1, `${answer}: exits 1`);
      t.match(stderr, answer === 'mismatch' ? /ERR_DIGEST_MISMATCH/ : /ERR_SOURCE_LOST/, `${answer}: the code says why`);
      t.notOk(existsSync(out), `${answer}: nothing written`);
      if (answer === 'mismatch') t.equal(source.connections(), 1, 'a mismatched digest is not asked again');
      else t.ok(source.connections() < 15, `${answer}: asked again with backoff, not in a loop (${source.connections()} connections)`);
    }
  },
);

t.test(
  'a source that freezes right after its digest (a fake that answers nothing more, no close; a real one stopped by SIGSTOP as the report prints): the restore exits',
  async (t) => {
    const image = randomImage(16, 5);
    const source = await fakeServingSource(t, image, 'frozen');
    const out = join(tempDir(t), 'restored.bin');
    // A long silence timeout: a link going quiet is noticed late, and the restore must not wait for that once its report is out.
    const restore = startRestoreCli(t, ['--source', source.address, '--workload', 'none', '--out', out, '--json', '--silence-timeout', '2m']);
    let exited: Awaited<typeof restore.exited> | undefined;
    void restore.exited.then((r) => (exited = r));
    const { code, signal, stdout } = await until('the restore to exit after its report, its source frozen', () => exited, 30_000);
    t.equal(signal, null);
    t.equal(code, 0, 'exits 0');
    t.equal(JSON.parse(stdout).digestMatch, true, 'the report was printed');
    t.ok(readFileSync(out).equals(image), '--out holds the image');

    // A real source stopped (SIGSTOP) the moment the report is printed.
    const dir = tempDir(t);
    const imagePath = writeImage(dir, randomImage(1024, 5));
    const serve = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 'src.sock')}`]);
    t.teardown(() => serve.child.kill('SIGKILL')); // a stopped process takes no SIGTERM
    const [cmd, ...pre] = cliCommand();
    const child = spawn(cmd, [...pre, 'restore', '--source', `unix:${serve.listening.path}`, '--json', '--silence-timeout', '2m'], {
      stdio: ['ignore', 'pipe', 'ignore'],
    });
    t.teardown(() => child.kill('SIGKILL'));
    let report = '';
    child.stdout.on('data', (d) => {
      if (!report) serve.child.kill('SIGSTOP');
      report += d;
    });
    let real: number | null | undefined;
    child.on('close', (c) => (real = c));
    await until('the restore to exit, its source stopped as it printed its report', () => real !== undefined, 30_000);
    t.equal(real, 0);
    t.equal(JSON.parse(report).digestMatch, true);
  },
);

/**
 * Connections that never authenticate, `perHost` from each of `hosts` (other
 * loopback addresses) to 127.0.0.1:`port`: half silent, half sending half a
 * frame header and then nothing. Each one closed is opened again 300 ms later,
 * at most `max` in all, until stop() (also at teardown).
 */
function floodUnauthenticated(t: Test, port: number, hosts: string[], perHost: number, max = 40_000) {
  let stopped = false;
  let opened = 0;
  const live = new Set<Socket>();
  const open = (host: string, slow: boolean) => {
    if (stopped || opened >= max) return;
    opened++;
    const s = netConnect({ host: '127.0.0.1', port, localAddress: host });
    live.add(s);
    s.on('error', () => {});
    s.resume(); // reads (and drops) what the source says, so its close is seen
    if (slow) s.once('connect', () => s.write(Buffer.from([0, 0])));
    s.once('close', () => {
      live.delete(s);
      setTimeout(() => open(host, slow), 300);
    });
  };
  for (const host of hosts) for (let i = 0; i < perHost; i++) open(host, i % 2 === 1);
  const stop = () => {
    stopped = true;
    for (const s of live) s.destroy();
  };
  t.teardown(stop);
  return { stop, opened: () => opened };
}

t.test(
  'a flood of connections that never authenticate starves no one: a restore and a resume during it end byte-exact; serve logs a summary, not a line per connection',
  async (t) => {
    const dir = tempDir(t);
    const image = randomImage(4096, 7);
    const imagePath = writeImage(dir, image);
    const serve = await startServeCli(t, ['--image', imagePath, '--listen', 'tcp:127.0.0.1:0']);
    const port = serve.listening.port as number;
    // More than the whole server's cap of connections still to authenticate, from two other addresses.
    const flood = floodUnauthenticated(t, port, ['127.0.0.2', '127.0.0.3'], Math.ceil((MAX_UNPROVEN_CONNECTIONS + 44) / 2));
    await until('the flood to fill the cap', () => flood.opened() > MAX_UNPROVEN_CONNECTIONS, 10_000);
    const floodStarted = Date.now();
    // A restore straight to the source, and one through a link that is cut mid-transfer: it pauses and resumes during the flood.
    const proxy = await FaultProxy.start(t, `tcp:127.0.0.1:${port}`);
    const direct = startRestoreCli(t, ['--source', `tcp:127.0.0.1:${port}`, '--workload', 'none', '--out', join(dir, 'direct.bin'), '--json']);
    const cut = startRestoreCli(t, [
      '--source',
      proxy.address,
      '--workload',
      'none',
      '--rate',
      '4M',
      '--out',
      join(dir, 'cut.bin'),
      '--json',
      '--silence-timeout',
      '1s',
    ]);
    let directOne: Awaited<typeof direct.exited> | undefined;
    let cutOne: Awaited<typeof cut.exited> | undefined;
    void direct.exited.then((r) => (directOne = r));
    void cut.exited.then((r) => (cutOne = r));
    await until('pages to flow through the link', () => proxy.carried(2, 'down') > 1 << 20 || cutOne, 60_000);
    proxy.breakAll('rst');
    const [a, b] = await until('both restores to end', () => directOne && cutOne && ([directOne, cutOne] as const), 120_000);
    // The flood goes on until serve has summed up at least one interval of it.
    const logLines = () =>
      serve
        .log()
        .split('\n')
        .filter((l) => l.startsWith('{'));
    const summariesOf = (lines: string[]) => lines.filter((l) => l.includes('connections turned away before they authenticated'));
    await until('serve to log a summary of the connections it turned away', () => summariesOf(logLines()).length > 0, 3 * ADMISSION_LOG_INTERVAL_MS);
    const floodMs = Date.now() - floodStarted;
    flood.stop();
    t.equal(
      a.code,
      0,
      `the restore during the flood: ${a.stderr
        .split('\n')
        .filter((l) => /"level":50/.test(l))
        .join('\n')}`,
    );
    t.ok(readFileSync(join(dir, 'direct.bin')).equals(image), 'byte-exact');
    t.equal(
      b.code,
      0,
      `the resumed restore during the flood: ${b.stderr
        .split('\n')
        .filter((l) => /"level":50/.test(l))
        .join('\n')}`,
    );
    t.ok(JSON.parse(b.stdout).recovery.resumes >= 1, 'it paused and resumed');
    t.ok(readFileSync(join(dir, 'cut.bin')).equals(image), 'byte-exact');
    const lines = logLines();
    const summaries = summariesOf(lines);
    t.ok(summaries.length <= Math.ceil(floodMs / ADMISSION_LOG_INTERVAL_MS) + 1, `one summary line per interval (${summaries.length} in ${floodMs} ms)`);
    t.ok(lines.length < 200, `serve's log stays small: ${lines.length} lines for ${flood.opened()} connections opened by the flood`);
    t.comment(summaries[0]);
  },
);

t.test('a data channel cut while a restore sets up its first connection: a pause and a resume, byte-exact (was: exit 1, nothing restored)', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(2048, 6));
  const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 'src.sock')}`]);
  const attachedBytes = encodeFrame({ t: 'attached' }).length;
  for (const cut of [
    { connection: 1, direction: 'down', afterBytes: attachedBytes, action: 'rst' },
    { connection: 2, direction: 'down', afterBytes: attachedBytes, action: 'fin' },
    { connection: 2, direction: 'down', afterBytes: attachedBytes, action: 'blackhole' },
  ] as const) {
    const proxy = await FaultProxy.start(t, `unix:${listening.path}`, join(tempDir(t), 'proxy.sock'));
    proxy.inject(cut);
    const out = join(dir, `restored-${cut.connection}-${cut.action}.mem`);
    const restore = startRestoreCli(t, ['--source', proxy.address, '--out', out, '--json', '--silence-timeout', '500ms']);
    const { code, stderr } = await restore.exited;
    const what = `${cut.action} ${cut.direction} on connection ${cut.connection} after ${cut.afterBytes} bytes`;
    t.equal(proxy.fired.length, 1, `${what}: the cut fired`);
    t.equal(code, 0, `${what}: the restore ends well ${code ? stderr.trim().split('\n').slice(-2).join(' | ') : ''}`);
    t.ok(existsSync(out) && readFileSync(out).equals(readFileSync(imagePath)), `${what}: byte-exact`);
  }
});
