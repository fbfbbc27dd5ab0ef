// postcopy handle: the page-fault handler VMMs hand their guest memory to.
import { parseArgs } from 'node:util';
import { VmmHandler } from '../client/vmm-handler.js';
import type { Logger } from '../lib/logger.js';
import { parseRecovery, parseSize, parseWindow, readTokenFile, recoveryOptionSpec, recoveryUsage, UsageError } from './options.js';

export const handleUsage = `postcopy handle --socket PATH --source unix:PATH|tcp:HOST:PORT [--token-file F]
                [--window F:B] [--no-background] [--rate SIZE]
                [--give-up-after DURATION] [--silence-timeout DURATION]

  Listens on PATH (0600). A VMM connects and sends a JSON array of its memory
  regions ([{"base_host_virt_addr", "size", "offset", "page_size"}], as
  Firecracker does) with its userfaultfd attached; the handler serves that
  memory's faults from the source until the VMM hangs up. Any number of VMMs.
  Prints one JSON line per finished VMM session.

  When the source dies or the link breaks, each VMM's session pauses (its
  faults wait) and reconnects by itself, resuming where it stopped. With
  --give-up-after, a session whose source stays out of reach that long
  poisons the pages still missing: the guest gets SIGBUS, never a hang.
${recoveryUsage}`;

export async function handle(argv: string[], log: Logger): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      socket: { type: 'string' }, source: { type: 'string' }, 'token-file': { type: 'string' },
      window: { type: 'string' }, 'no-background': { type: 'boolean' }, rate: { type: 'string' },
      ...recoveryOptionSpec,
    },
    strict: true,
  });
  if (!values.socket || !values.source) throw new UsageError(handleUsage);
  const window = parseWindow(values.window, handleUsage);
  const handler = new VmmHandler({
    source: values.source,
    token: readTokenFile(values['token-file'], log),
    logger: log,
    recovery: parseRecovery(values),
    ...(window ? { window } : {}),
    background: { enabled: !values['no-background'], rateBytesPerSecond: values.rate ? parseSize(values.rate, '--rate') : 0 },
  });
  handler.on('session-end', (summary) => process.stdout.write(JSON.stringify(summary) + '\n'));
  await handler.listen(values.socket);
  process.stdout.write(JSON.stringify({ listening: { kind: 'unix', path: values.socket } }) + '\n');
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  log.info('shutting down');
  await handler.close();
}
