// postcopy serve: a source page server for one image.
import { Image } from '../server/image.js';
import { PageServer } from '../server/page-server.js';
import type { Logger } from '../lib/logger.js';
import { parseCommandLine, parseDuration, requireOptions, sourceToken, parseAddressOption, parseMetricsOption, loggingUsage, UsageError } from './options.js';
import { ErrorCode, type PostcopyError } from '../lib/errors.js';
import { serveMetrics } from '../lib/metrics.js';
import { sourceMetrics } from '../server/source-metrics.js';

export const serveUsage = `postcopy serve --image FILE [--image FILE ...] --listen unix:PATH|tcp:HOST:PORT [--token-file F]
               [--resume-grace DURATION] [--metrics tcp:HOST:PORT] [--release-as-sent]

  Serves the image (each --image is one region, in order) to any number of
  destinations until SIGINT or SIGTERM. Files are mapped read-only; holes go
  out as zero runs without being read. Listening beyond loopback needs a token.
  A destination whose connection breaks may resume its session within
  --resume-grace (default 60s); after a restart of this process it resumes
  all the same, from the pages it holds. --metrics serves Prometheus metrics
  at http://HOST:PORT/metrics (port 0: a free one; the URL is printed as
  {"metrics": URL}).

  --release-as-sent frees the image's memory page by page as the destination
  installs it (never merely sends it), so moving it on one host never holds
  two copies. The image must be shared memory this process may write (a file
  on tmpfs such as /dev/shm); one destination; the image is consumed.
${loggingUsage}`;

export async function serve(argv: string[], log: Logger): Promise<void> {
  const values = parseCommandLine(argv, {
    image: { type: 'string', multiple: true },
    listen: { type: 'string' },
    'token-file': { type: 'string' },
    'resume-grace': { type: 'string' },
    metrics: { type: 'string' },
    'release-as-sent': { type: 'boolean' },
  });
  requireOptions(values, ['image', 'listen'], 'postcopy serve --image FILE --listen unix:PATH|tcp:HOST:PORT');
  const listen = values.listen as string;
  parseAddressOption(listen, '--listen');
  const metrics = values.metrics === undefined ? undefined : parseMetricsOption(values.metrics);
  const resumeGraceMs = values['resume-grace'] === undefined ? undefined : parseDuration(values['resume-grace'], '--resume-grace');
  const image = Image.open((values.image as string[]).map((path) => ({ path })));
  const { token, tokenFile } = sourceToken(values['token-file'], listen, log);
  let server: PageServer;
  try {
    server = new PageServer({ image, token, logger: log, ...(resumeGraceMs ? { resumeGraceMs } : {}), releaseAsSent: values['release-as-sent'] === true });
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
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  log.info('shutting down');
  await served?.close();
  await server.close();
  image.close();
}
