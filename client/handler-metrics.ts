// `handle --metrics`: what a handler's VMM sessions have seen, as Prometheus metrics.
import { Registry } from 'prom-client';
import { LATENCY_BOUNDS_S, collectedHistogram, oncePerScrape, readGauge, totalCounter } from '../lib/metrics.js';
import type { VmmHandler } from './vmm-handler.js';

export function handlerMetrics(handler: VmmHandler): Registry {
  const registry = new Registry();
  const figures = oncePerScrape(() => handler.figures());
  const t = () => figures().totals;
  readGauge(registry, 'postcopy_handler_sessions', 'VMM sessions, by state', ['state'], () =>
    Object.entries(figures().sessions).map(([state, n]) => [{ state }, n]),
  );
  collectedHistogram(registry, 'postcopy_fault_latency_seconds', 'From reading a fault to the page installed, per fault waited on', LATENCY_BOUNDS_S, () => {
    const x = t();
    return { buckets: x.latencyBuckets, count: x.latencyCount, sum: x.latencySumNs / 1e9 };
  });
  totalCounter(registry, 'postcopy_faults_total', 'Page faults read from VMM userfaultfds', [], () => [[{}, t().faults]]);
  totalCounter(registry, 'postcopy_blocked_seconds_total', 'Time guest threads spent waiting in faults', [], () => [[{}, t().blockedNs / 1e9]]);
  totalCounter(
    registry,
    'postcopy_pages_total',
    'Pages installed, by how they came: on_demand, window (the pages around each request), background; zero (zero runs, of those); duplicate (arrived when already present)',
    ['kind'],
    () => {
      const x = t();
      return [
        [{ kind: 'on_demand' }, x.pagesOnDemand],
        [{ kind: 'window' }, x.pagesWindow],
        [{ kind: 'background' }, x.pagesBackground],
        [{ kind: 'zero' }, x.zeroPages],
        [{ kind: 'duplicate' }, x.duplicatePages],
      ];
    },
  );
  totalCounter(registry, 'postcopy_bytes_received_total', 'Bytes read from data channels', [], () => [[{}, t().bytesReceived]]);
  totalCounter(registry, 'postcopy_errors_total', 'Errors, by code (lib/errors.ts)', ['code'], () => figures().errors.map(([code, n]) => [{ code }, n]));
  return registry;
}
