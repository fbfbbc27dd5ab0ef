// `serve --metrics`: what a source has served, as Prometheus metrics.
import { Registry } from 'prom-client';
import { oncePerScrape, readGauge, totalCounter } from '../lib/metrics.js';
import type { PageServer } from './page-server.js';

export function sourceMetrics(server: PageServer): Registry {
  const registry = new Registry();
  const f = oncePerScrape(() => server.figures());
  readGauge(registry, 'postcopy_source_sessions', 'Destination sessions held, by state', ['state'], () =>
    Object.entries(f().sessions).map(([state, n]) => [{ state }, n]),
  );
  totalCounter(registry, 'postcopy_source_requests_total', 'Page requests received from destinations', [], () => [[{}, f().requests]]);
  totalCounter(
    registry,
    'postcopy_source_pages_sent_total',
    'Pages sent, by why: requested, window (the pages around each request), background, prefetch (a working set replayed), resent (a request for a page already streamed)',
    ['kind'],
    () => {
      const x = f();
      return [
        [{ kind: 'requested' }, x.pagesRequested - x.pagesResent],
        [{ kind: 'resent' }, x.pagesResent],
        [{ kind: 'window' }, x.pagesWindow],
        [{ kind: 'background' }, x.pagesBackground],
        [{ kind: 'prefetch' }, x.pagesPrefetched],
      ];
    },
  );
  totalCounter(registry, 'postcopy_source_zero_pages_total', 'Pages sent as zero runs (holes, no bytes on the wire)', [], () => [[{}, f().zeroPages]]);
  totalCounter(registry, 'postcopy_source_bytes_sent_total', 'Bytes written to data channels', [], () => [[{}, f().bytesSent]]);
  totalCounter(registry, 'postcopy_errors_total', 'Errors, by code (lib/errors.ts)', ['code'], () => f().errors.map(([code, n]) => [{ code }, n]));
  return registry;
}
