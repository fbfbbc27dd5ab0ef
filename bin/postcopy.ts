#!/usr/bin/env node
// postcopy: the one CLI entry. Subcommands: serve, restore, bench, demo.
import { parseArgs } from 'node:util';
import { createLogger } from '../lib/logger.js';
import { PostcopyError } from '../lib/errors.js';
import { serve, serveUsage } from './serve.js';
import { handle, handleUsage } from './handle.js';
import { restore, restoreUsage } from './restore.js';
import { demo, demoUsage } from './demo.js';
import { latencyBench, throughputBench, floorCommand, type Transport } from '../bench/latency.js';
import { parseCount, UsageError } from './options.js';

const usage = `usage: postcopy <command> [options]

commands:
  demo       move a real image from a source process to a destination and show what happened
  serve      serve an image to destinations
  handle     be the page-fault handler VMMs hand their userfaultfd to (Firecracker style)
  restore    restore an image from a source into this process's memory
  bench      latency | throughput: our figures beside the floor's, same run

${serveUsage}

${restoreUsage}

${handleUsage}

postcopy bench latency|throughput [--pages N] [--transport unix|tcp|both] [--seed S] [--json]

${demoUsage}
`;

async function bench(argv: string[]): Promise<void> {
  const [which = 'latency', ...rest] = argv;
  const { values } = parseArgs({ args: rest, options: { pages: { type: 'string' }, transport: { type: 'string' }, seed: { type: 'string' }, json: { type: 'boolean' } }, strict: true });
  if (!['latency', 'throughput'].includes(which)) throw new UsageError(usage);
  const transport = values.transport ?? 'both';
  if (!['unix', 'tcp', 'both'].includes(transport)) throw new UsageError(usage);
  const transports: Transport[] = transport === 'both' ? ['unix', 'tcp'] : [transport as Transport];
  const pages = parseCount(values.pages, '--pages', which === 'latency' ? 32768 : 65536, 1 << 24);
  const seed = parseCount(values.seed, '--seed', 1, 0xffffffff);
  if (!floorCommand() && !values.json) process.stderr.write('note: ../shared/floor/run not found (set UFFD_FLOOR); figures come without ratios\n');
  for (const t of transports) {
    const result = which === 'latency' ? await latencyBench(pages, t, seed) : await throughputBench(pages, t);
    process.stdout.write(JSON.stringify(result) + '\n');
  }
}

async function main(): Promise<number> {
  const [command, ...argv] = process.argv.slice(2);
  // demo and bench print their own report; their logs only speak up for problems.
  const quiet = command === 'demo' || command === 'bench';
  const log = createLogger({ name: `postcopy-${command ?? 'cli'}`, level: process.env.POSTCOPY_LOG_LEVEL ?? (quiet ? 'warn' : 'info') });
  try {
    switch (command) {
      case 'serve': await serve(argv, log); return 0;
      case 'restore': await restore(argv, log); return 0;
      case 'handle': await handle(argv, log); return 0;
      case 'demo': await demo(argv, log); return 0;
      case 'bench': await bench(argv); return 0;
      case undefined: case 'help': case '--help': case '-h':
        process.stdout.write(usage);
        return command === undefined ? 2 : 0;
      default:
        throw new UsageError(usage);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(err.message + '\n');
      return 2;
    }
    const e = err as PostcopyError & { errno?: number; syscall?: string };
    log.error({ code: e.code, errno: e.errno, syscall: e.syscall, err: e.message }, `${command} failed`);
    process.stderr.write(`postcopy ${command}: ${e.message}${e.code ? ` (${e.code})` : ''}\n`);
    return 1;
  }
}

process.exitCode = await main();
