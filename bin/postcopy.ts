#!/usr/bin/env node
// postcopy: the one CLI entry (demo, serve, handle, restore, bench, qemu,
// store). Help and the version are answered from text alone; any other
// command loads bin/run.ts, and through it that command's module.
import { packageVersion } from '../lib/package-root.js';
import { shortUsage, usage, usageOf } from './usage.js';

function answeredHere(command: string | undefined, argv: string[]): number | null {
  if (command === '--version' || command === '-v') {
    process.stdout.write(`uffd-postcopy ${packageVersion()}\n`);
    return 0;
  }
  if (command === undefined) {
    // A mistake, not a request for help: a few lines where mistakes go, not the whole manual.
    process.stderr.write(`${shortUsage}\n`);
    return 2;
  }
  if (command === 'help' || command === '--help' || command === '-h') {
    process.stdout.write(usage);
    return 0;
  }
  // --help anywhere after a command (before a --): that command's usage, and nothing else is done.
  const helpAt = argv.indexOf('--');
  if (usageOf[command] && (helpAt < 0 ? argv : argv.slice(0, helpAt)).some((a) => a === '--help' || a === '-h')) {
    process.stdout.write(usageOf[command] + '\n');
    return 0;
  }
  return null;
}

const [command, ...argv] = process.argv.slice(2);
const code = answeredHere(command, argv) ?? (await (await import('./run.js')).run(command, argv));
// A failed command exits now, whatever it left running (a child, a timer);
// stderr is a file or a pipe, both written synchronously on Linux.
if (code !== 0) process.exit(code);
