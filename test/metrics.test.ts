// Prometheus metrics scraped over HTTP from a real `serve` and a real
// `handle` while they work, and after.
import t from 'tap';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { connect as netConnect, createServer } from 'node:net';
import { Registry } from 'prom-client';
import { oncePerScrape, totalCounter } from '../lib/metrics.js';
import { buildFixture, cliCommand, randomImage, runCli, startServeCli, tempDir, writeImage, until } from './helpers.js';

async function scrape(url: string): Promise<Map<string, number>> {
  const res = await fetch(url);
  if (res.status !== 200) throw new Error(`GET ${url}: ${res.status}`);
  const out = new Map<string, number>();
  for (const line of (await res.text()).split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

t.test('serve --metrics: scraped while a restore runs and after it, the figures add up', async (t) => {
  const dir = tempDir(t);
  const pages = 2048;
  const imagePath = writeImage(dir, randomImage(pages, 4));
  const { listening, metrics: url } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 's.sock')}`, '--metrics', 'tcp:127.0.0.1:0']);
  t.match(url, /^http:\/\/127\.0\.0\.1:\d+\/metrics$/, 'the URL is printed at start-up');
  const before = await scrape(url as string);
  t.equal(before.get('postcopy_source_bytes_sent_total'), 0);
  // A slow restore (the background stream capped), so the scrape lands in the middle of it.
  const [cmd, ...pre] = cliCommand();
  const restore = spawn(cmd, [...pre, 'restore', '--source', `unix:${listening.path}`, '--workload', 'none', '--rate', '2M', '--json'], {
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  await until('one active session in the metrics', async () => (await scrape(url as string)).get('postcopy_source_sessions{state="active"}') === 1);
  t.pass('a scrape during the restore shows its session active');
  const [code] = await once(restore, 'close');
  t.equal(code, 0);
  const after = await scrape(url as string);
  const sent = ['requested', 'resent', 'window', 'background'].reduce((n, kind) => n + (after.get(`postcopy_source_pages_sent_total{kind="${kind}"}`) ?? 0), 0);
  t.equal(sent, pages, 'every page was sent once, and counted once');
  t.ok((after.get('postcopy_source_bytes_sent_total') ?? 0) > 0.7 * pages * 4096, 'bytes sent are counted (zero pages travel as runs)');
  t.ok((after.get('postcopy_source_zero_pages_total') ?? -1) >= 0);
});

t.test('handle --metrics: fault latency as a histogram, pages by kind, sessions, errors by code', async (t) => {
  const dir = tempDir(t);
  const pages = 1024;
  const imagePath = writeImage(dir, randomImage(pages, 5));
  const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 's.sock')}`]);
  const handlerSocket = join(dir, 'h.sock');
  const [cmd, ...pre] = cliCommand();
  const handler = spawn(
    cmd,
    [...pre, 'handle', '--socket', handlerSocket, '--source', `unix:${listening.path}`, '--metrics', 'tcp:127.0.0.1:0', '--no-background'],
    { stdio: ['ignore', 'pipe', 'ignore'] },
  );
  t.teardown(() => {
    handler.kill('SIGTERM');
  });
  const lines = createInterface({ input: handler.stdout! })[Symbol.asyncIterator]();
  t.match(JSON.parse((await lines.next()).value), { listening: { path: handlerSocket } });
  const url = JSON.parse((await lines.next()).value).metrics as string;
  t.match(url, /^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
  // A handshake that is not JSON (and brings no userfaultfd): refused, and counted by its code.
  const bad = netConnect(handlerSocket);
  await once(bad, 'connect');
  bad.end('not a handshake');
  await once(bad, 'close');
  const vmm = spawn(buildFixture('vmm'), ['--socket', handlerSocket, '--image', imagePath, '--threads', '2'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const [code] = await once(vmm, 'close');
  t.equal(code, 0, 'the VMM verified every byte');
  t.ok(JSON.parse((await lines.next()).value).vmmPid, 'the session ended');
  const m = await scrape(url);
  const faults = m.get('postcopy_faults_total') ?? 0;
  t.ok(faults > 0, `faults counted (${faults})`);
  const count = m.get('postcopy_fault_latency_seconds_count') ?? 0;
  t.ok(count > 0 && count <= faults, `fault latency observed for faults waited on (${count})`);
  t.equal(m.get('postcopy_fault_latency_seconds_bucket{le="+Inf"}'), count, 'the +Inf bucket holds them all');
  let previous = 0;
  for (const le of ['0.00001', '0.0001', '0.001', '0.01', '0.1', '1', '10']) {
    const n = m.get(`postcopy_fault_latency_seconds_bucket{le="${le}"}`) ?? -1;
    t.ok(n >= previous && n <= count, `bucket le=${le} is cumulative (${n})`);
    previous = n;
  }
  t.ok((m.get('postcopy_fault_latency_seconds_sum') ?? 0) > 0);
  const installed = ['on_demand', 'window', 'background'].reduce((n, kind) => n + (m.get(`postcopy_pages_total{kind="${kind}"}`) ?? 0), 0);
  t.equal(installed, pages, 'every guest page installed once, by kind');
  t.ok((m.get('postcopy_bytes_received_total') ?? 0) > 0);
  t.ok((m.get('postcopy_blocked_seconds_total') ?? -1) >= 0);
  const errors = [...m].filter(([k]) => k.startsWith('postcopy_errors_total{code="ERR_'));
  t.ok(errors.length > 0 && errors.every(([, n]) => n >= 1), `the refused handshake is counted by its code (${errors.map(([k]) => k).join(', ')})`);
  t.equal(m.get('postcopy_handler_sessions{state="verified"}') ?? 0, 0, 'no session is left once its VMM is gone');
});

t.test('a counter read from running totals never goes back, even when a read dips', async (t) => {
  const registry = new Registry();
  let value = 10;
  totalCounter(registry, 'test_total', 'a running total', [], () => [[{}, value]]);
  const read = async () => Number(/^test_total (\d+)/m.exec(await registry.metrics())?.[1]);
  t.equal(await read(), 10);
  value = 9; // a reader caught a data-plane thread between two updates
  t.equal(await read(), 10, 'held at its highest');
  value = 12;
  t.equal(await read(), 12);
});

t.test('handle refuses at start-up a --metrics port another process holds', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(16));
  const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 's.sock')}`]);
  const taken = createServer();
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
  t.teardown(() => taken.close());
  const port = (taken.address() as { port: number }).port;
  const r = await runCli(['handle', '--socket', join(dir, 'h.sock'), '--source', `unix:${listening.path}`, '--metrics', `tcp:127.0.0.1:${port}`]);
  t.equal(r.code, 1);
  t.match(r.stderr, /ERR_ADDRESS_IN_USE/);
});

t.test('one scrape reads the figures once, and the next scrape reads them afresh', async (t) => {
  let reads = 0;
  const figures = oncePerScrape(() => ++reads);
  const registry = new Registry();
  totalCounter(registry, 'a_total', 'a', [], () => [[{}, figures()]]);
  totalCounter(registry, 'b_total', 'b', [], () => [[{}, figures()]]);
  const first = await registry.metrics();
  t.equal(reads, 1, 'two metrics, one read');
  t.match(first, /^a_total 1$/m);
  t.match(first, /^b_total 1$/m, 'both show the same instant');
  await new Promise((r) => setImmediate(r));
  t.match(await registry.metrics(), /^a_total 2$/m, 'the next scrape reads again');
  t.equal(reads, 2);
});
