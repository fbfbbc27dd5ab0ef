// `serve --metrics`: what a source has served, as Prometheus metrics
// (README.md, Metrics, lists them). Pages sent are split by kind, each send
// under one kind; zero pages are some of them.
import type { Registry } from 'prom-client';
import { metricsRegistry, oncePerScrape, readGauge, totalCounter } from '../lib/metrics.js';
import type { PageServer } from './page-server.js';

export function sourceMetrics(server: Pick<PageServer, 'figures'>): Registry {
  const registry = metricsRegistry();
  const f = oncePerScrape(() => server.figures());
  readGauge(registry, 'postcopy_source_sessions', 'Destination sessions held, by state', ['state'], () =>
    Object.entries(f().sessions).map(([state, n]) => [{ state }, n]),
  );
  totalCounter(registry, 'postcopy_source_requests_total', 'Page requests received from destinations', [], () => [[{}, f().requests]]);
  totalCounter(
    registry,
    'postcopy_source_pages_sent_total',
    'Pages sent, by why (each send under one kind): requested, resent (requested again after the background stream sent it), window (around a requested page), prefetch (a working set replayed), background',
    ['kind'],
    () => {
      const x = f();
      return [
        [{ kind: 'requested' }, x.pagesRequested - x.pagesResent],
        [{ kind: 'resent' }, x.pagesResent],
        [{ kind: 'window' }, x.pagesWindow],
        [{ kind: 'prefetch' }, x.pagesPrefetched],
        [{ kind: 'background' }, x.pagesBackground],
      ];
    },
  );
  totalCounter(registry, 'postcopy_source_zero_pages_total', 'Pages sent as zero runs (no bytes on the wire); some of the pages sent', [], () => [
    [{}, f().zeroPages],
  ]);
  totalCounter(registry, 'postcopy_source_sent_bytes_total', 'Bytes written to data channels', [], () => [[{}, f().bytesSent]]);
  totalCounter(registry, 'postcopy_source_errors_total', 'Errors, by code (lib/errors.ts)', ['code'], () => f().errors.map(([code, n]) => [{ code }, n]));
  return registry;
}
