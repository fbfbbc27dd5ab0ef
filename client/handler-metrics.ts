// `handle --metrics`: what a handler's VMM sessions have seen, as Prometheus
// metrics (README.md, Metrics, lists them). Pages installed are split by kind,
// each page under one kind; zero and duplicate pages are counted apart.
import type { Registry } from 'prom-client';
import { LATENCY_BOUNDS_S, collectedHistogram, metricsRegistry, oncePerScrape, readGauge, totalCounter } from '../lib/metrics.js';
import type { VmmHandler } from './vmm-handler.js';

export function handlerMetrics(handler: Pick<VmmHandler, 'figures'>): Registry {
  const registry = metricsRegistry();
  const figures = oncePerScrape(() => handler.figures());
  const t = () => figures().totals;
  readGauge(registry, 'postcopy_handler_sessions', 'VMM sessions, by the state of their page session (connecting: being opened)', ['state'], () =>
    Object.entries(figures().sessions).map(([state, n]) => [{ state }, n]),
  );
  collectedHistogram(
    registry,
    'postcopy_handler_fault_latency_seconds',
    'How long guest threads waited for a missing page: from its first fault to its install, once per page waited for',
    LATENCY_BOUNDS_S,
    () => {
      const x = t();
      return { buckets: x.latencyBuckets, count: x.latencyCount, sum: x.latencySumNs / 1e9 };
    },
  );
  totalCounter(registry, 'postcopy_handler_faults_total', 'Page faults read from VMM userfaultfds', [], () => [[{}, t().faults]]);
  totalCounter(
    registry,
    'postcopy_handler_pages_installed_total',
    'Pages installed in guest memory, by why they came (each page under one kind): on_demand (a thread faulted on it), window (around a faulted page), prefetch (a working set replayed), background',
    ['kind'],
    () => {
      const x = t();
      return [
        [{ kind: 'on_demand' }, x.pagesOnDemand],
        [{ kind: 'window' }, x.pagesWindow],
        [{ kind: 'prefetch' }, x.pagesPrefetched],
        [{ kind: 'background' }, x.pagesBackground],
      ];
    },
  );
  totalCounter(
    registry,
    'postcopy_handler_zero_pages_total',
    'Pages installed as zeros (zero runs: no bytes on the wire); some of the pages installed',
    [],
    () => [[{}, t().zeroPages]],
  );
  totalCounter(registry, 'postcopy_handler_duplicate_pages_total', 'Pages that arrived when already present (not installed again)', [], () => [
    [{}, t().duplicatePages],
  ]);
  totalCounter(registry, 'postcopy_handler_received_bytes_total', 'Bytes read from data channels', [], () => [[{}, t().bytesReceived]]);
  totalCounter(registry, 'postcopy_handler_errors_total', 'Errors, by code (lib/errors.ts)', ['code'], () =>
    figures().errors.map(([code, n]) => [{ code }, n]),
  );
  return registry;
}
