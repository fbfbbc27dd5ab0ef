// postcopy serve: a source page server for one image.
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import type { Logger } from '../lib/logger.js';
import {
  parseChoice,
  parseCommandLine,
  parseCount,
  parseDuration,
  requireOptions,
  parseStoreOptions,
  storeOptionSpec,
  storeImageOf,
  sourceToken,
  checkSocketDirectory,
  parseListenOption,
  parseMetricsOption,
  UsageError,
} from './options.js';
import { LiveMigration, LiveWorkload, type LiveOptions } from '../server/live.js';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { serveMetrics } from '../lib/metrics.js';
import { sourceMetrics } from '../server/source-metrics.js';
import { parseImageUrl } from '../lib/store/address.js';
import { ChunkCache } from '../lib/store/chunk-cache.js';
import { SnapshotStore } from '../lib/store/snapshot-store.js';
import type { TenantKey } from '../lib/store/tenant.js';
import { formatAddress } from '../lib/address.js';
import { asService, serviceOptionSpec } from './service.js';

/** Options of one way of serving that the other does not take. */
const LIVE_ONLY = ['socket', 'migration', 'downtime-limit', 'max-precopy-rounds', 'postcopy-after', 'resume-workload'];
const IMAGE_ONLY = ['image', 'resume-grace', 'metrics', 'release-as-sent', ...Object.keys(storeOptionSpec)];

export async function serve(argv: string[], log: Logger): Promise<void> {
  const live = argv.includes('--live');
  const stray = argv.map((a) => /^--([a-z-]+)/.exec(a)?.[1]).find((o) => o !== undefined && (live ? IMAGE_ONLY : LIVE_ONLY).includes(o));
  if (stray)
    throw new UsageError(
      live
        ? `--${stray} is for serving an image (serve --image); serve --live moves a running workload's own memory, and does not take it`
        : `--${stray} is for moving a running workload (serve --live --socket PATH); add --live, or leave --${stray} out`,
    );
  if (live) return serveLive(argv, log);
  const values = parseCommandLine(argv, {
    image: { type: 'string', multiple: true },
    listen: { type: 'string' },
    'token-file': { type: 'string' },
    'resume-grace': { type: 'string' },
    metrics: { type: 'string' },
    'release-as-sent': { type: 'boolean' },
    ...storeOptionSpec,
    ...serviceOptionSpec,
  });
  requireOptions(values, ['image', 'listen'], 'postcopy serve --image FILE --listen unix:PATH|tcp:HOST:PORT');
  const storeImage = storeImageOf(values.image);
  const { cache, tenant } = parseStoreOptions(values, storeImage !== undefined);
  if (storeImage && values['release-as-sent'])
    throw new UsageError('--release-as-sent frees a shared-memory image as it moves; an image in a store stays in the store');
  const listen = values.listen as string;
  parseListenOption(listen, '--listen');
  const service = asService(values.pidfile, log);
  const metrics = values.metrics === undefined ? undefined : parseMetricsOption(values.metrics);
  const resumeGraceMs = values['resume-grace'] === undefined ? undefined : parseDuration(values['resume-grace'], '--resume-grace');
  const releaseAsSent = values['release-as-sent'] === true;
  const image = storeImage
    ? await imageFromStore(storeImage, cache, tenant, log)
    : Image.open(
        (values.image as string[]).map((path) => ({ path })),
        { releaseAsSent },
      );
  const { token, tokenFile } = sourceToken(values['token-file'], listen, log);
  let server: PageServer;
  try {
    server = new PageServer({ image, token, logger: log, ...(resumeGraceMs ? { resumeGraceMs } : {}), releaseAsSent });
  } catch (err) {
    image.close();
    if ((err as PostcopyError).code === ErrorCode.IMAGE_INVALID && values['release-as-sent']) throw new UsageError((err as Error).message);
    throw err;
  }
  await server.listen(listen);
  const served = metrics ? await serveMetrics(metrics, sourceMetrics(server)) : undefined;
  // Tell a parent that spawned us where we listen (port 0 resolves here), and which token file it needs.
  process.stdout.write(JSON.stringify({ listening: server.address, ...(tokenFile ? { tokenFile } : {}) }) + '\n');
  if (served) process.stdout.write(JSON.stringify({ metrics: served.url }) + '\n');
  service.ready(`serving ${(values.image as string[]).join(' ')} on ${formatAddress(server.address!)}`);
  // Release as sent: once the one destination holds every page, the image has moved and this exits (0).
  const stop = await new Promise<string>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
    if (releaseAsSent) void server.whenConsumed().then(() => resolve('consumed'));
  });
  service.stopping(stop === 'consumed' ? 'the image has moved: the destination holds every page' : `${stop}: shutting down`);
  log.info('shutting down');
  await served?.close();
  await server.close();
  image.close();
}

/** An image of a snapshot store, fetched whole into memory and checked against its manifest's digest. */
async function imageFromStore(url: string, cache: { dir?: string; maxBytes?: number }, tenant: TenantKey | undefined, log: Logger): Promise<Image> {
  let at;
  try {
    at = parseImageUrl(url);
  } catch (err) {
    throw new UsageError(`--image ${(err as Error).message}`);
  }
  const store = new SnapshotStore(at, { logger: log, ...(tenant ? { tenant } : {}) });
  try {
    const started = Date.now();
    const { manifest, regions } = await store.download(at.name, { cache: new ChunkCache({ ...cache, logger: log }) });
    const image = Image.open(regions.map((buffer, i) => ({ buffer, name: manifest.regions[i].name })));
    const digests = await Promise.all(image.regions.map((r) => image.digest(r.id)));
    if (digests.some((d, i) => d !== manifest.regions[i].sha256)) {
      image.close();
      throw new PostcopyError(ErrorCode.STORE_CORRUPT, `${url}: the image put together from its chunks does not match its manifest's digest`);
    }
    log.info({ image: url, bytes: image.totalBytes, tookMs: Date.now() - started, fetched: store.objects.stats }, 'fetched the image from the store');
    return image;
  } finally {
    store.close();
  }
}

/** serve --live: waits for the workload, then moves it to the first destination that connects. */
async function serveLive(argv: string[], log: Logger): Promise<void> {
  const values = parseCommandLine(argv, {
    live: { type: 'boolean' },
    socket: { type: 'string' },
    listen: { type: 'string' },
    'token-file': { type: 'string' },
    migration: { type: 'string' },
    'downtime-limit': { type: 'string' },
    'max-precopy-rounds': { type: 'string' },
    'postcopy-after': { type: 'string' },
    'resume-workload': { type: 'string' },
    ...serviceOptionSpec,
  });
  requireOptions(values, ['socket', 'listen'], 'postcopy serve --live --socket PATH --listen unix:PATH|tcp:HOST:PORT');
  const resumeFor = values['resume-workload'] as string | undefined;
  checkSocketDirectory(values.socket as string, '--socket ');
  const listen = values.listen as string;
  parseListenOption(listen, '--listen');
  const service = asService(values.pidfile, log);
  const mode = parseChoice(values.migration, '--migration', ['precopy+postcopy', 'postcopy', 'precopy'] as const, 'precopy+postcopy');
  const options: LiveOptions = {
    mode,
    logger: log,
    ...(values['downtime-limit'] !== undefined ? { downtimeLimitMs: parseDuration(values['downtime-limit'], '--downtime-limit') } : {}),
    ...(values['max-precopy-rounds'] !== undefined
      ? { maxPrecopyRounds: parseCount(values['max-precopy-rounds'], '--max-precopy-rounds', 30, 100000, 1) }
      : {}),
    ...(values['postcopy-after'] !== undefined ? { postcopyAfterMs: parseDuration(values['postcopy-after'], '--postcopy-after') } : {}),
  };
  const { token, tokenFile } = sourceToken(values['token-file'], listen, log);
  const workload = await LiveWorkload.accept(values.socket as string, { logger: log });
  if (resumeFor !== undefined) {
    // The operator carries the destination's word that it gave up this migration: only then may the workload run here again.
    if (workload.pausedFor !== resumeFor) {
      workload.close();
      throw new PostcopyError(
        ErrorCode.MIGRATION_MISMATCH,
        workload.pausedFor
          ? `the workload (pid ${workload.pid}) is paused for migration ${workload.pausedFor}, not ${resumeFor}: it stays paused`
          : `the workload (pid ${workload.pid}) is not paused for a migration: --resume-workload ${resumeFor} names nothing to resume`,
      );
    }
    workload.resume();
    log.warn({ pid: workload.pid, migration: resumeFor }, 'its destination gave the migration up: the workload runs here again');
  }
  const live = new LiveMigration(workload, options);
  const server = new PageServer({ image: workload.image, token, logger: log, live });
  const requestSwitchover = () => live.requestSwitchover();
  process.on('SIGUSR2', requestSwitchover);
  try {
    await server.listen(listen);
    process.stdout.write(
      JSON.stringify({
        listening: server.address,
        ...(tokenFile ? { tokenFile } : {}),
        workload: workload.pid,
        ...(workload.pausedFor ? { readopted: workload.pausedFor } : {}),
        ...(resumeFor ? { resumed: resumeFor } : {}),
      }) + '\n',
    );
    service.ready(`moving the workload (pid ${workload.pid}) to the first destination on ${formatAddress(server.address!)}`);
    live.on('report', (report) => {
      process.stdout.write(JSON.stringify({ live: report }) + '\n');
      service.status(`switched over: the workload runs at the destination, postcopy brings the rest`);
    });
    const outcome = await new Promise<Error | null>((resolve) => {
      live.once('finished', () => resolve(null));
      live.once('aborted', (err: Error) => resolve(err));
      workload.once('gone', (err: Error) => live.state === 'waiting' && resolve(err));
      process.once('SIGINT', () => resolve(null));
      process.once('SIGTERM', () => resolve(null));
    });
    service.stopping(outcome ? `failed: ${outcome.message}` : live.state === 'migrated' ? 'the workload has moved' : 'shutting down');
    if (outcome) throw outcome;
    // The destination says bye after the digest: give it a moment, then close.
    await new Promise((r) => setTimeout(r, 200));
  } finally {
    process.off('SIGUSR2', requestSwitchover);
    await server.close();
    workload.close();
  }
}
