import t from 'tap';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomImage, runCli, startServeCli, tempDir, writeImage } from './helpers.js';

t.test('serve and restore as separate processes: token, --out, --json', async (t) => {
  const dir = tempDir(t);
  const image = randomImage(1024, 3);
  const imagePath = writeImage(dir, image);
  const tokenPath = join(dir, 'token');
  writeFileSync(tokenPath, 'a shared secret\n', { mode: 0o600 });
  const socket = join(dir, 'src.sock');
  const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${socket}`, '--token-file', tokenPath]);
  t.same(listening, { kind: 'unix', path: socket });
  const out = join(dir, 'restored.bin');
  const r = await runCli(['restore', '--source', `unix:${socket}`, '--token-file', tokenPath, '--out', out, '--json', '--window', '4:1']);
  t.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  t.match(report, { pages: 1024, digestMatch: true, window: { forward: 4, backward: 1 } });
  t.ok(report.faults > 0, 'the default workload faulted pages in');
  t.ok(readFileSync(out).equals(image), '--out holds the image');
  const logs = r.stderr.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  t.ok(logs.some((l) => l.msg === 'restore finished' && l.digestMatch === true), 'pino JSON logs on stderr');
});

t.test('restore over TCP with no workload is pure background transfer', async (t) => {
  const dir = tempDir(t);
  const image = randomImage(512);
  const { listening } = await startServeCli(t, ['--image', writeImage(dir, image), '--listen', 'tcp:127.0.0.1:0']);
  const r = await runCli(['restore', '--source', `tcp:127.0.0.1:${listening.port}`, '--workload', 'none', '--json']);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout), { faults: 0, pagesBackground: 512, digestMatch: true });
});

t.test('a wrong token fails the restore with a clear message and exit code 1', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'good'), 'good', { mode: 0o600 });
  writeFileSync(join(dir, 'bad'), 'bad', { mode: 0o600 });
  const socket = join(dir, 's.sock');
  await startServeCli(t, ['--image', writeImage(dir, randomImage(8)), '--listen', `unix:${socket}`, '--token-file', join(dir, 'good')]);
  const r = await runCli(['restore', '--source', `unix:${socket}`, '--token-file', join(dir, 'bad')]);
  t.equal(r.code, 1);
  t.match(r.stderr, /ERR_AUTH_FAILED/);
});

t.test('serve refuses to listen beyond loopback without a token', async (t) => {
  const dir = tempDir(t);
  const r = await runCli(['serve', '--image', writeImage(dir, randomImage(8)), '--listen', 'tcp:0.0.0.0:0']);
  t.equal(r.code, 1);
  t.match(r.stderr, /ERR_AUTH_REQUIRED/);
});

t.test('usage errors exit 2 with the usage text', async (t) => {
  const r = await runCli(['frobnicate']);
  t.equal(r.code, 2);
  t.match(r.stderr, /usage: postcopy/);
  const missing = await runCli(['restore']);
  t.equal(missing.code, 2);
  t.match(missing.stderr, /--source/);
});

t.test('bench latency prints one JSON line per transport with our percentiles (and the floor when present)', async (t) => {
  const r = await runCli(['bench', 'latency', '--pages', '512', '--transport', 'unix', '--json']);
  t.equal(r.code, 0, r.stderr);
  const line = JSON.parse(r.stdout.trim());
  t.match(line, { case: 'latency', transport: 'unix', pages: 512, ours: { p50_us: Number, p99_us: Number } });
  if (line.floor) t.match(line, { floor: { case: 'unix', pages: 512 }, ratio: { p50: Number, p99: Number } });
  else t.equal(line.ratio, null, 'no floor here, so no ratio');
});

t.test('demo moves a real image between two processes and reports it', async (t) => {
  const r = await runCli(['demo', '--size', '16M']);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /source = destination/);
  t.match(r.stdout, /on demand\s+\d+/);
  t.match(r.stdout, /postcopy serve, pid \d+/);
});
