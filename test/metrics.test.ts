// Prometheus metrics scraped over HTTP from a real `serve` and a real
// `handle` while they work, and after.
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { join } from 'node:path';
import { connect as netConnect, createServer } from 'node:net';
import { Registry } from 'prom-client';
import { oncePerScrape, totalCounter } from '../lib/metrics.js';
import { packageVersion } from '../lib/package-root.js';
import { PROTOCOL_VERSION } from '../lib/protocol.js';
import { handlerMetrics } from '../client/handler-metrics.js';
import { emptyTotals } from '../client/handler-totals.js';
import { sourceMetrics } from '../server/source-metrics.js';
import type { ServerFigures } from '../server/figures.js';
import { buildFixture, cliCommand, here, randomImage, runCli, startServeCli, tempDir, writeImage, until } from './helpers.js';

/** One scrape: each series (`name{labels}`) with its value, and each metric family with its type. */
interface Scrape {
  series: Map<string, number>;
  families: Map<string, string>;
}

function parseScrape(text: string): Scrape {
  const series = new Map<string, number>();
  const families = new Map<string, string>();
  for (const line of text.split('\n')) {
    const type = /^# TYPE (\S+) (\S+)$/.exec(line);
    if (type) families.set(type[1], type[2]);
    if (!line || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    series.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return { series, families };
}

async function scrapeAll(url: string): Promise<Scrape> {
  const res = await fetch(url);
  if (res.status !== 200) throw new Error(`GET ${url}: ${res.status}`);
  return parseScrape(await res.text());
}

async function scrape(url: string): Promise<Map<string, number>> {
  return (await scrapeAll(url)).series;
}

/** The values of `label` in the series of `family`, each with its value. */
function byLabel(series: Map<string, number>, family: string, label: string): Map<string, number> {
  const out = new Map<string, number>();
  const pattern = new RegExp(`^${family}\\{.*\\b${label}="([^"]*)"`);
  for (const [key, value] of series) {
    const m = pattern.exec(key);
    if (m) out.set(m[1], value);
  }
  return out;
}

const sum = (values: Iterable<number>) => [...values].reduce((a, b) => a + b, 0);

/** A row of the README's metrics tables: under which table ('both', 'source', 'handler'), its type, and the label values it names. */
interface ReadmeMetric {
  table: string;
  type: string;
  values: string[];
}

/** The metrics the README's Metrics section lists, by name. */
function readmeMetrics(): Map<string, ReadmeMetric> {
  const readme = readFileSync(join(here, '..', 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('\n## Metrics\n'), readme.indexOf('\n## ', readme.indexOf('\n## Metrics\n') + 1));
  const out = new Map<string, ReadmeMetric>();
  let table = '';
  for (const line of section.split('\n')) {
    if (line.startsWith('Both')) table = 'both';
    if (line.startsWith('The source')) table = 'source';
    if (line.startsWith('The handler')) table = 'handler';
    const row = /^\| `(postcopy_[a-z_]+)(?:\{[a-z_,]+\})?` \| (\w+) \| (.*) \|$/.exec(line);
    if (row) out.set(row[1], { table, type: row[2], values: [...row[3].matchAll(/`([a-z_]+)`/g)].map((m) => m[1]) });
  }
  return out;
}

/**
 * What every scrape of `side` ('source' or 'handler') must show: prom-client's
 * default process metrics under their standard names, postcopy_build_info, every
 * other metric named postcopy_<side>_, exactly the metrics the README lists
 * (with their types), and for each metric by state or kind, exactly the values
 * the README names, each present (a state no session is in reads 0).
 */
function checkExported(t: Test, m: Scrape, side: 'source' | 'handler'): void {
  t.ok((m.series.get('process_cpu_seconds_total') ?? -1) >= 0, 'process_cpu_seconds_total is exported under its standard name');
  t.ok(m.families.has('process_resident_memory_bytes') && m.families.has('nodejs_eventloop_lag_seconds'), "prom-client's default metrics are exported");
  t.equal(
    m.series.get(`postcopy_build_info{version="${packageVersion()}",node="${process.version}",protocol="${PROTOCOL_VERSION}"}`),
    1,
    'postcopy_build_info says what runs',
  );
  const own = [...m.families.keys()].filter((name) => !/^(process|nodejs)_/.test(name) && name !== 'postcopy_build_info');
  t.same(
    own.filter((name) => !name.startsWith(`postcopy_${side}_`)),
    [],
    `every metric but the process's and postcopy_build_info is named postcopy_${side}_ (${own.length} of them)`,
  );
  const listed = [...readmeMetrics()].filter(([, r]) => r.table === side || r.table === 'both');
  t.same(
    Object.fromEntries([...m.families].filter(([name]) => name.startsWith('postcopy_'))),
    Object.fromEntries(listed.map(([name, r]) => [name, r.type])),
    'the README lists exactly the metrics exported, with their types',
  );
  for (const [name, r] of listed) {
    for (const label of ['state', 'kind']) {
      const seen = byLabel(m.series, name, label);
      if (seen.size > 0)
        t.same([...seen.keys()].sort(), [...r.values].sort(), `${name}: the README names every ${label}, and every ${label} it names is exported`);
    }
  }
}

t.test('serve --metrics: scraped while a restore runs and after it, the figures add up', async (t) => {
  const dir = tempDir(t);
  const pages = 2048;
  const imagePath = writeImage(dir, randomImage(pages, 4));
  const { listening, metrics: url } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 's.sock')}`, '--metrics', 'tcp:127.0.0.1:0']);
  t.match(url, /^http:\/\/127\.0\.0\.1:\d+\/metrics$/, 'the URL is printed at start-up');
  const beforeAll = await scrapeAll(url as string);
  const before = beforeAll.series;
  t.equal(before.get('postcopy_source_sent_bytes_total'), 0);
  checkExported(t, beforeAll, 'source');
  const idle = byLabel(before, 'postcopy_source_sessions', 'state');
  t.ok(idle.size === 7 && sum(idle.values()) === 0, `with no session, every state reads 0 (${[...idle.keys()].join(', ')})`);
  // A slow restore (the background stream capped), so the scrape lands in the middle of it.
  const [cmd, ...pre] = cliCommand();
  const restore = spawn(cmd, [...pre, 'restore', '--source', `unix:${listening.path}`, '--workload', 'none', '--rate', '2M', '--json'], {
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  await until('one active session in the metrics', async () => (await scrape(url as string)).get('postcopy_source_sessions{state="active"}') === 1);
  t.pass('a scrape during the restore shows its session active');
  const [code] = await once(restore, 'close');
  t.equal(code, 0);
  const afterAll = await scrapeAll(url as string);
  const after = afterAll.series;
  checkExported(t, afterAll, 'source');
  const sent = byLabel(after, 'postcopy_source_pages_sent_total', 'kind');
  t.equal(sum(sent.values()), pages, `every page was sent once, and counted under one kind (${[...sent].map(([k, n]) => `${k} ${n}`).join(', ')})`);
  t.ok((after.get('postcopy_source_sent_bytes_total') ?? 0) > 0.7 * pages * 4096, 'bytes sent are counted (zero pages travel as runs)');
  const zero = after.get('postcopy_source_zero_pages_total') ?? -1;
  t.ok(zero > 0 && zero < pages, `zero pages are some of the pages sent (${zero})`);
});

t.test('handle --metrics: fault latency as a histogram, pages by kind, sessions, errors by code, process metrics', async (t) => {
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
  // The URL is the supervisor's; its worker serves it once started.
  const idleAll = await until('the worker to serve the metrics', () => scrapeAll(url).catch(() => undefined));
  checkExported(t, idleAll, 'handler');
  const idle = byLabel(idleAll.series, 'postcopy_handler_sessions', 'state');
  t.ok(idle.size === 8 && sum(idle.values()) === 0, `with no VMM, every state reads 0 (${[...idle.keys()].join(', ')})`);
  // A handshake that is not JSON (and brings no userfaultfd): refused, and counted by its code.
  const bad = netConnect(handlerSocket);
  await once(bad, 'connect');
  bad.end('not a handshake');
  await once(bad, 'close');
  const vmm = spawn(buildFixture('vmm'), ['--socket', handlerSocket, '--image', imagePath, '--threads', '2'], { stdio: ['ignore', 'ignore', 'inherit'] });
  const [code] = await once(vmm, 'close');
  t.equal(code, 0, 'the VMM verified every byte');
  t.ok(JSON.parse((await lines.next()).value).vmmPid, 'the session ended');
  const all = await scrapeAll(url);
  const m = all.series;
  checkExported(t, all, 'handler');
  const faults = m.get('postcopy_handler_faults_total') ?? 0;
  t.ok(faults > 0, `faults counted (${faults})`);
  const count = m.get('postcopy_handler_fault_latency_seconds_count') ?? 0;
  t.ok(count > 0 && count <= faults, `fault latency observed for faults waited on (${count})`);
  t.equal(m.get('postcopy_handler_fault_latency_seconds_bucket{le="+Inf"}'), count, 'the +Inf bucket holds them all');
  let previous = 0;
  for (const le of ['0.00001', '0.0001', '0.001', '0.01', '0.1', '1', '10']) {
    const n = m.get(`postcopy_handler_fault_latency_seconds_bucket{le="${le}"}`) ?? -1;
    t.ok(n >= previous && n <= count, `bucket le=${le} is cumulative (${n})`);
    previous = n;
  }
  t.ok((m.get('postcopy_handler_fault_latency_seconds_sum') ?? 0) > 0, 'the time waited is the histogram sum');
  t.notOk(
    [...all.families.keys()].some((name) => name.includes('blocked')),
    'no blocked-seconds counter beside the histogram (its sum is that figure)',
  );
  const installed = byLabel(m, 'postcopy_handler_pages_installed_total', 'kind');
  t.equal(
    sum(installed.values()),
    pages,
    `every guest page installed once, counted under one kind (${[...installed].map(([k, n]) => `${k} ${n}`).join(', ')})`,
  );
  const zero = m.get('postcopy_handler_zero_pages_total') ?? -1;
  t.ok(zero > 0 && zero < pages, `zero pages are some of those installed (${zero})`);
  t.ok((m.get('postcopy_handler_duplicate_pages_total') ?? -1) >= 0, 'duplicates are counted apart');
  t.ok((m.get('postcopy_handler_received_bytes_total') ?? 0) > 0);
  const errors = [...m].filter(([k]) => k.startsWith('postcopy_handler_errors_total{code="ERR_'));
  t.ok(errors.length > 0 && errors.every(([, n]) => n >= 1), `the refused handshake is counted by its code (${errors.map(([k]) => k).join(', ')})`);
  const sessions = byLabel(m, 'postcopy_handler_sessions', 'state');
  t.ok(sessions.size === 8 && sum(sessions.values()) === 0, 'no session is left once its VMM is gone, and every state reads 0');
});

t.test('pages by kind: each page under one kind, the working set (prefetch) among them; zero and duplicate pages apart', async (t) => {
  const totals = { ...emptyTotals(), pagesOnDemand: 3, pagesWindow: 5, pagesPrefetched: 7, pagesBackground: 11, zeroPages: 4, duplicatePages: 2 };
  const handler = parseScrape(await handlerMetrics({ figures: () => ({ sessions: {}, totals, errors: [] }) }).metrics()).series;
  t.same(Object.fromEntries(byLabel(handler, 'postcopy_handler_pages_installed_total', 'kind')), { on_demand: 3, window: 5, prefetch: 7, background: 11 });
  t.equal(handler.get('postcopy_handler_zero_pages_total'), 4);
  t.equal(handler.get('postcopy_handler_duplicate_pages_total'), 2);
  const served: ServerFigures = {
    sessions: {},
    errors: [],
    requests: 4,
    pagesRequested: 4,
    pagesResent: 1,
    pagesWindow: 8,
    pagesPrefetched: 16,
    pagesBackground: 32,
    zeroPages: 2,
    bytesSent: 0,
  };
  const source = parseScrape(await sourceMetrics({ figures: () => served }).metrics()).series;
  t.same(Object.fromEntries(byLabel(source, 'postcopy_source_pages_sent_total', 'kind')), { requested: 3, resent: 1, window: 8, prefetch: 16, background: 32 });
  t.equal(source.get('postcopy_source_zero_pages_total'), 2);
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
