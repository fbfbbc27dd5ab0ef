// postcopy handle: the page-fault handler VMMs hand their guest memory to.
// By default a supervisor process holds the VMMs' connections and
// userfaultfds and a worker process serves them, restarted when it dies.
import { VmmHandler } from '../client/vmm-handler.js';
import { HandlerSupervisor, serveHandoffs } from '../client/handler-supervisor.js';
import type { Logger } from '../lib/logger.js';
import {
  parseCommandLine,
  parseRate,
  parseRecovery,
  parseWindow,
  destinationToken,
  withTokenFile,
  recoveryOptionSpec,
  parseAddressOption,
  checkSocketDirectory,
  parseMetricsOption,
  withConcretePort,
  withoutOption,
  UsageError,
  checkWritable,
  parseStoreOptions,
  storeOptionSpec,
  storeImageOf,
} from './options.js';
import { parseImageUrl } from '../lib/store/address.js';
import { selfCommand } from '../lib/package-root.js';
import { serveMetrics } from '../lib/metrics.js';
import { handlerMetrics } from '../client/handler-metrics.js';
import type { PostcopyError } from '../lib/errors.js';
import { Image } from '../lib/image.js';
import { readWorkingSet } from '../client/working-set.js';
import { asService, serviceOptionSpec } from './service.js';

const optionSpec = {
  socket: { type: 'string' },
  source: { type: 'string', multiple: true },
  image: { type: 'string', multiple: true },
  'record-working-set': { type: 'string' },
  prefetch: { type: 'string' },
  'in-place': { type: 'boolean' },
  template: { type: 'string' },
  'token-file': { type: 'string' },
  window: { type: 'string' },
  'no-background': { type: 'boolean' },
  rate: { type: 'string' },
  'single-process': { type: 'boolean' },
  worker: { type: 'boolean' },
  metrics: { type: 'string' },
  ...recoveryOptionSpec,
  ...storeOptionSpec,
  ...serviceOptionSpec,
} as const;

export async function handle(argv: string[], log: Logger): Promise<void> {
  const values = parseCommandLine(argv, optionSpec);
  const usage = 'postcopy handle --socket PATH (--source unix:PATH|tcp:HOST:PORT | --image FILE)';
  const storeImage = storeImageOf(values.image);
  const { cache, tenant } = parseStoreOptions(values, storeImage !== undefined);
  if (storeImage) {
    try {
      parseImageUrl(storeImage);
    } catch (err) {
      throw new UsageError(`--image ${(err as Error).message}`);
    }
    if (values.template !== undefined)
      throw new UsageError('--template fills its template from a source (--source); an image in a store is restored by each VMM itself');
  }
  if (values.image && values.source) throw new UsageError('--image serves a local file, --source a source: give one or the other');
  const missing = [...(values.worker || values.socket ? [] : ['--socket']), ...(values.image || values.source?.length ? [] : ['--source (or --image)'])];
  if (missing.length) throw new UsageError(`${missing.join(' and ')} ${missing.length > 1 ? 'are' : 'is'} required (${usage})`);
  if (values.socket) checkSocketDirectory(values.socket, '--socket ');
  // The supervisor (or the single process) is the service; its worker is not, and is started without --pidfile.
  const service = asService(values.worker ? undefined : values.pidfile, log);
  for (const s of values.source ?? []) parseAddressOption(s, '--source');
  const window = parseWindow(values.window);
  const record = values['record-working-set'];
  if (record !== undefined) {
    if (values.window !== undefined)
      throw new UsageError('--record-working-set serves each fault alone (no window), so the set holds exactly the pages touched: drop --window');
    if (values.prefetch !== undefined)
      throw new UsageError('--record-working-set and --prefetch: record without a replay, so the set holds every page touched');
    checkWritable(record, '--record-working-set');
  }
  const prefetch = values.prefetch === undefined ? undefined : readWorkingSet(values.prefetch);
  if (values.image && values['in-place']) throw new UsageError('--in-place takes the memory of a source (--source); --image serves a file here already');
  if (values.image && !storeImage && values.rate !== undefined)
    throw new UsageError("--rate limits a source's background stream; a local --image has none to limit");
  if (values.template !== undefined && values['in-place']) throw new UsageError('--template shares its own copy of the image: drop --in-place');
  if (values.template !== undefined && record !== undefined)
    throw new UsageError("--template: a clone's working set cannot be recorded; drop --record-working-set");
  // A template lives in the process that fills it: a restarted worker could not give its clones the same memory.
  const singleProcess = values['single-process'] || values.template !== undefined;
  const metrics = values.metrics === undefined ? undefined : parseMetricsOption(values.metrics);
  if (values['no-background'] && values.rate !== undefined)
    throw new UsageError('--rate limits the background stream, which --no-background turns off: give one or the other');
  const common = {
    logger: log,
    ...(window ? { window } : {}),
    background: { enabled: !values['no-background'], rateBytesPerSecond: parseRate(values.rate) },
    ...(record !== undefined ? { recordWorkingSet: record } : {}),
    ...(prefetch ? { prefetch } : {}),
    ...(values.template !== undefined ? { template: values.template } : {}),
  };
  const image = values.image && !storeImage ? Image.open(values.image.map((path) => ({ path }))) : undefined;
  const [source, ...replicas] = values.source ?? [];
  const handler = storeImage
    ? new VmmHandler({ storeImage, cache, ...(tenant ? { tenant } : {}), recovery: parseRecovery(values), ...common })
    : image
      ? new VmmHandler({ image, ...common })
      : new VmmHandler({
          source,
          replicas,
          token: destinationToken(values['token-file'], source, log),
          recovery: parseRecovery(values),
          ...(values['in-place'] ? { inPlace: true } : {}),
          ...common,
        });
  // A worker's stdout is its supervisor's pipe: once the supervisor is gone there is no one to tell.
  let supervisorGone = false;
  if (values.worker) process.stdout.on('error', () => {});
  const print = (line: string) => void (supervisorGone || process.stdout.write(line + '\n'));
  // A VMM must not be the first to find out that the source is not there. (A
  // worker restarted after a crash does not ask: its VMMs' sessions wait and resume.)
  if (!values.worker) {
    const ready = await handler.checkSource().catch((err) => {
      const named = source ? withTokenFile(err, values['token-file'], source) : err;
      throw Object.assign(named as Error, { message: `${(named as Error).message}; not starting (a VMM would wait on it)` });
    });
    if (!image && !storeImage)
      log.info({ source, regions: ready.regions.length, imageBytes: ready.regions.reduce((n, r) => n + r.length, 0) }, 'the source answers');
  }
  // The process that serves the VMMs keeps watching the source (the worker, or the single process); a supervisor has no sessions to speak of.
  if (values.worker || singleProcess) handler.watchSource();
  handler.on('session-end', (summary) => print(JSON.stringify(summary)));
  if (values.worker) {
    // The supervisor chose the metrics port and printed it; pages matter more than metrics, so a failure here is only logged.
    const served = metrics
      ? await serveMetrics(metrics, handlerMetrics(handler)).catch(
          (err) => void log.error({ code: (err as PostcopyError).code, err: (err as Error).message }, 'metrics not served'),
        )
      : undefined;
    // The supervisor's side of the link is fd 3 (see client/handler-supervisor.ts).
    await serveHandoffs(handler, 3, print, log);
    supervisorGone = true;
    // The supervisor died (or was killed): its VMMs are ours alone now. Each is served until it hangs up; a VMM costs at most a pause.
    if (handler.activeSessions > 0) {
      log.warn({ vmms: handler.activeSessions }, 'the supervisor is gone; the worker serves the VMMs it holds until each hangs up, then exits');
      await new Promise<void>((resolve) => {
        const check = () => {
          if (handler.activeSessions > 0) return;
          handler.off('released', check);
          resolve();
        };
        handler.on('released', check);
        check();
      });
    }
    await served?.close();
    log.info('the supervisor is gone and no VMM is left; worker exiting');
    await handler.close();
    image?.close();
    return;
  }
  const socket = values.socket!;
  let close: () => Promise<void>;
  let metricsUrl: string | undefined;
  if (singleProcess) {
    await handler.listen(socket);
    const served = metrics ? await serveMetrics(metrics, handlerMetrics(handler)) : undefined;
    metricsUrl = served?.url;
    close = async () => {
      await served?.close();
      await handler.close();
    };
  } else {
    // The worker serves the metrics; a fixed port (chosen here for port 0) survives its restarts.
    const fixed = metrics ? await withConcretePort(metrics) : undefined;
    const workerArgv = [...withoutOption(withoutOption(argv, '--metrics'), '--pidfile'), ...(fixed ? ['--metrics', fixed.address] : [])];
    metricsUrl = fixed?.url;
    const supervisor = new HandlerSupervisor({ workerCommand: [...selfCommand(), 'handle', '--worker', ...workerArgv], logger: log });
    supervisor.on('line', print);
    await supervisor.listen(socket);
    close = () => supervisor.close();
  }
  print(JSON.stringify({ listening: { kind: 'unix', path: socket } }));
  if (metricsUrl) print(JSON.stringify({ metrics: metricsUrl }));
  service.ready(`handling VMMs on ${socket}, their pages from ${storeImage ?? values.image?.join(' ') ?? values.source!.join(', ')}`);
  const stop = await new Promise<string>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  service.stopping(`${stop}: shutting down`);
  log.info('shutting down');
  await close();
  image?.close();
}
