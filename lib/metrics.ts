// Prometheus metrics (prom-client) over HTTP: the plumbing `serve --metrics`
// and `handle --metrics` share. Figures are read from the sessions on each
// scrape, never counted twice: counters are set from running totals.
import { createServer, type Server } from 'node:http';
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import { parseAddress } from './address.js';
import { ErrorCode, PostcopyError } from './errors.js';
import { packageVersion } from './package-root.js';
import { PROTOCOL_VERSION } from './protocol.js';

/** Fault-latency bucket bounds in seconds: 10 µs to 10 s. */
export const LATENCY_BOUNDS_S = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/**
 * A registry holding what every process that serves metrics exports besides
 * its own: prom-client's default process and Node.js metrics, under their
 * standard names (process_cpu_seconds_total, process_resident_memory_bytes,
 * nodejs_eventloop_lag_seconds, ...), and postcopy_build_info.
 */
export function metricsRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  new Gauge({
    name: 'postcopy_build_info',
    help: 'Always 1; its labels say what runs: the package version, the Node.js version, the wire protocol version',
    labelNames: ['version', 'node', 'protocol'],
    registers: [registry],
  }).set({ version: packageVersion(), node: process.version, protocol: String(PROTOCOL_VERSION) }, 1);
  return registry;
}

/**
 * `read`, called once per scrape however many metrics ask: every metric of a
 * scrape shows the same instant, and the sessions are walked once. (prom-client
 * collects all metrics of a scrape in one go; the next scrape reads afresh.)
 */
export function oncePerScrape<T>(read: () => T): () => T {
  let taken: { value: T } | null = null;
  return () => {
    if (!taken) {
      taken = { value: read() };
      setImmediate(() => (taken = null));
    }
    return taken.value;
  };
}

/** Counts by key (errors by code, ...), kept for the life of the process. */
export class Tally {
  readonly #counts = new Map<string, number>();
  add(key: string, n = 1): void {
    this.#counts.set(key, (this.#counts.get(key) ?? 0) + n);
  }
  entries(): [string, number][] {
    return [...this.#counts];
  }
}

/**
 * A counter whose value (per label set) is read from a running total at each
 * scrape. It never goes back: totals read while a data-plane thread is between
 * two updates may dip for an instant, and Prometheus would take a dip for a
 * restart.
 */
export function totalCounter(registry: Registry, name: string, help: string, labelNames: string[], read: () => [Record<string, string>, number][]): void {
  const highest = new Map<string, number>();
  new Counter({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const [labels, value] of read()) {
        const key = JSON.stringify(labels);
        const v = Math.max(0, value, highest.get(key) ?? 0);
        highest.set(key, v);
        this.inc(labels, v);
      }
    },
  });
}

/** A gauge read at each scrape. */
export function readGauge(registry: Registry, name: string, help: string, labelNames: string[], read: () => [Record<string, string>, number][]): void {
  new Gauge({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      for (const [labels, value] of read()) this.set(labels, value);
    },
  });
}

/** What a histogram's buckets hold at a scrape: cumulative counts per bound, the total and the sum. */
export interface HistogramReading {
  buckets: number[];
  count: number;
  sum: number;
}

/**
 * A histogram whose counts are kept elsewhere (by the native engines), read at
 * each scrape; registered with prom-client's registry like its own metrics.
 */
export function collectedHistogram(registry: Registry, name: string, help: string, bounds: readonly number[], read: () => HistogramReading): void {
  registry.registerMetric({
    name,
    help,
    type: 'histogram',
    aggregator: 'sum',
    get() {
      const r = read();
      return {
        name,
        help,
        type: 'histogram',
        aggregator: 'sum',
        values: [
          ...bounds.map((le, i) => ({ metricName: `${name}_bucket`, labels: { le }, value: r.buckets[i] ?? 0 })),
          { metricName: `${name}_bucket`, labels: { le: '+Inf' }, value: r.count },
          { metricName: `${name}_sum`, labels: {}, value: r.sum },
          { metricName: `${name}_count`, labels: {}, value: r.count },
        ],
      };
    },
  } as unknown as Parameters<Registry['registerMetric']>[0]);
}

/** Where the metrics of HOST:PORT are scraped. */
export function metricsUrl(host: string, port: number): string {
  return `http://${host.includes(':') ? `[${host}]` : host}:${port}/metrics`;
}

/** Serves `registry` as Prometheus text on GET /metrics at tcp:HOST:PORT (port 0: a free one). */
export async function serveMetrics(address: string, registry: Registry): Promise<{ url: string; close: () => Promise<void> }> {
  const where = parseAddress(address);
  if (where.kind !== 'tcp') throw new PostcopyError(ErrorCode.INVALID_ADDRESS, `metrics are served over HTTP: give tcp:HOST:PORT, not ${address}`);
  const server: Server = createServer((req, res) => {
    if (req.method !== 'GET' || req.url?.split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('only GET /metrics here\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (err: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`${err.message}\n`),
    );
  });
  server.keepAliveTimeout = 5000;
  server.headersTimeout = 10_000;
  server.requestTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(new PostcopyError(err.code === 'EADDRINUSE' ? ErrorCode.ADDRESS_IN_USE : ErrorCode.INVALID_ADDRESS, `metrics at ${address}: ${err.message}`)),
    );
    server.listen(where.port, where.host, () => resolve());
  });
  const bound = server.address();
  const port = bound && typeof bound === 'object' ? bound.port : where.port;
  return {
    url: metricsUrl(where.host, port),
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
