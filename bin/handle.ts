// postcopy handle: the page-fault handler VMMs hand their guest memory to.
// By default a supervisor process holds the VMMs' connections and
// userfaultfds and a worker process serves them, restarted when it dies.
import { parseArgs } from 'node:util';
import { VmmHandler } from '../client/vmm-handler.js';
import { HandlerSupervisor, serveHandoffs } from '../client/handler-supervisor.js';
import type { Logger } from '../lib/logger.js';
import { parseRecovery, parseSize, parseWindow, destinationToken, recoveryOptionSpec, recoveryUsage, selfCommand, UsageError } from './options.js';

export const handleUsage = `postcopy handle --socket PATH --source unix:PATH|tcp:HOST:PORT [--token-file F]
                [--window F:B] [--no-background] [--rate SIZE]
                [--give-up-after DURATION] [--silence-timeout DURATION] [--single-process]

  Listens on PATH (0600). A VMM connects and sends a JSON array of its memory
  regions ([{"base_host_virt_addr", "size", "offset", "page_size"}], as
  Firecracker does) with its userfaultfd attached; the handler serves that
  memory's faults from the source until the VMM hangs up. Any number of VMMs.
  Prints one JSON line per finished VMM session.

  When the source dies or the link breaks, each VMM's session pauses (its
  faults wait) and reconnects by itself, resuming where it stopped. With
  --give-up-after, a session whose source stays out of reach that long
  poisons the pages still missing: the guest gets SIGBUS, never a hang.
  The handler survives its own crash: a supervisor holds every VMM's socket
  and userfaultfd and restarts the worker that serves them
  (--single-process: one process, no supervisor).
${recoveryUsage}`;

const optionSpec = {
  socket: { type: 'string' }, source: { type: 'string' }, 'token-file': { type: 'string' },
  window: { type: 'string' }, 'no-background': { type: 'boolean' }, rate: { type: 'string' },
  'single-process': { type: 'boolean' }, worker: { type: 'boolean' },
  ...recoveryOptionSpec,
} as const;

export async function handle(argv: string[], log: Logger): Promise<void> {
  const { values } = parseArgs({ args: argv, options: optionSpec, strict: true });
  if (!values.source || (!values.socket && !values.worker)) throw new UsageError(handleUsage);
  const window = parseWindow(values.window, handleUsage);
  const handler = new VmmHandler({
    source: values.source,
    token: destinationToken(values['token-file'], values.source, log),
    logger: log,
    recovery: parseRecovery(values),
    ...(window ? { window } : {}),
    background: { enabled: !values['no-background'], rateBytesPerSecond: values.rate ? parseSize(values.rate, '--rate') : 0 },
  });
  const print = (line: string) => process.stdout.write(line + '\n');
  handler.on('session-end', (summary) => print(JSON.stringify(summary)));
  if (values.worker) {
    // The supervisor's side of the link is fd 3 (see client/handler-supervisor.ts).
    await serveHandoffs(handler, 3, print, log);
    log.info('the supervisor is gone; worker exiting');
    await handler.close();
    return;
  }
  const socket = values.socket!;
  let close: () => Promise<void>;
  if (values['single-process']) {
    await handler.listen(socket);
    close = () => handler.close();
  } else {
    const supervisor = new HandlerSupervisor({ workerCommand: [...selfCommand(), 'handle', '--worker', ...argv], logger: log });
    supervisor.on('line', print);
    await supervisor.listen(socket);
    close = () => supervisor.close();
  }
  print(JSON.stringify({ listening: { kind: 'unix', path: socket } }));
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  log.info('shutting down');
  await close();
}
