// postcopy serve: a source page server for one image.
import { parseArgs } from 'node:util';
import { Image } from '../server/image.js';
import { PageServer } from '../server/page-server.js';
import type { Logger } from '../lib/logger.js';
import { readTokenFile, UsageError } from './options.js';

export const serveUsage = `postcopy serve --image FILE [--image FILE ...] --listen unix:PATH|tcp:HOST:PORT [--token-file F]

  Serves the image (each --image is one region, in order) to any number of
  destinations until SIGINT or SIGTERM. Files are mapped read-only; holes go
  out as zero runs without being read. Listening beyond loopback needs a token.`;

export async function serve(argv: string[], log: Logger): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: { image: { type: 'string', multiple: true }, listen: { type: 'string' }, 'token-file': { type: 'string' } },
    strict: true,
  });
  if (!values.image?.length || !values.listen) throw new UsageError(serveUsage);
  const image = Image.open(values.image.map((path) => ({ path })));
  const server = new PageServer({ image, token: readTokenFile(values['token-file'], log), logger: log });
  await server.listen(values.listen);
  // Tell a parent that spawned us where we listen (port 0 resolves here).
  process.stdout.write(JSON.stringify({ listening: server.address }) + '\n');
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  log.info('shutting down');
  await server.close();
  image.close();
}
