#!/usr/bin/env node
// postcopy: the one CLI entry. Subcommands: serve, restore, bench, demo.
import { addonError, addonNotBuilt } from '../lib/native.js';
import { packageVersion } from '../lib/package-root.js';
import { LOG_LEVELS, createLogger, type LogFormat, type Logger } from '../lib/logger.js';
import { clearProgress } from './terminal.js';
import { PostcopyError } from '../lib/errors.js';
import { serve, serveUsage } from './serve.js';
import { handle, handleUsage } from './handle.js';
import { restore, restoreUsage } from './restore.js';
import { demo, demoUsage } from './demo.js';
import { qemu, qemuUsage } from './qemu.js';
import { store, storeUsage } from './store.js';
import type { Transport } from '../bench/latency.js';
import { parseChoice, parseCommandLine, parseCount, parseRate, parseSize, UsageError } from './options.js';
import { join } from 'node:path';

const benchUsage = `postcopy bench [--full] [--out DIR] [--pages N] [--link NAME ...] [--json]
  Links (unix, tcp, veth links between network namespaces at data-centre
  rates) x access patterns x transfer policies (x image sizes with --full),
  each beside bench/floor.c (a plain-C page service) measured in the same run.
  Writes results.json, report.md and SVG plots to ./reports/<time>/ in the
  current directory, or --out DIR (see bench/README.md).

postcopy bench latency|throughput [--pages N] [--transport T,T,...] [--seed S] [--rounds R] [--json]
  The floor's own workload only (one thread, every page once, random order;
  or the whole image streamed), ours and bench/floor.c's interleaved R times
  (default 3): the ratio is the median of the per-round ratios, with their
  spread. --transport: unix, tcp (default unix,tcp), and for latency image:
  faults served from the image file in this process, beside the floor's
  local case.

postcopy bench local [--pages N] [--rounds R] [--seed S] [--json]
  restoring on one host, each beside the floor's local case (a plain-C
  handler copying each fault from memory in its own process): fault latency
  from a local image (--image), and a cold start from a local image and from
  a unix-socket source with and without --prefetch of a recorded working set
  (demand faults, time until the workload finishes).

postcopy bench localhost [--pages N] [--clones N,N,...] [--json]
  Memory on one host (anonymous and shared memory, sampled from /proc every
  10 ms): peak of source and destination together over the image's size for
  a move of N pages (default 262144: 1 GiB) by copy, --release-as-sent and
  --in-place; and for 1, 4 and 16 clones (--clones) of an image a quarter
  that size through handle --template: peak memory, the destination side's
  memory, pages the source sent, and each clone's time to read and check
  every page.

postcopy bench live [--pages N] [--write-rates P,P,...] [--rate SIZE] [--json]
  A running workload (the VMM fixture, writing P% of its N pages a second;
  default 1,10,50 and 65536 pages) moved to a restore by pure postcopy,
  precopy then postcopy, and precopy alone, side by side: the pause (workload
  paused to destination running), total time, bytes sent, the destination's
  faults in its first second, rounds, pages discarded. --rate: the link's
  rate in bytes a second, suffixes binary (1 Gb/s is 125000000, about 119M;
  default: a unix socket's).

postcopy bench qemu [--guest-mib N] [--rounds R] [--json]
  The test guest (test/guest: Debian's kernel and busybox, a program checking
  N MiB of its memory every second; default 64) booted under TCG, saved by
  QEMU (exec:cat) and imported from that stream; then, alternating R rounds
  (default 3): postcopy qemu restore of the snapshot against QEMU's own
  restore of the same stream (-incoming "exec:cat FILE"): time to the guest
  running and to completion, and our page-request latency; beside them, the
  same guest migrated QEMU to QEMU in postcopy, without and with
  postcopy-preempt. Needs qemu-system-x86 and the Debian package lists.

postcopy bench store [--pages N] [--chunk-sizes S,S,...] [--cases C,C,...] [--json]
  The snapshot store on the S3 endpoint the AWS variables name (eval
  "$(npm run --silent store:up)" starts a Ceph RGW here), each figure beside
  its baseline on the same store in the same run: dedup (20 children of a
  base pushed with their parent: bytes stored against base + what differs),
  cold (a random tenth of N pages, default 65536, with an empty cache: fault
  p50/p99 against a GET of one chunk; bytes fetched against bytes needed),
  and full (time to full residency against one GET of the same bytes), per
  chunk size (default 64K,128K,256K,512K); warm (the cold case again, cache
  warm, beside the floor's local case); prefetch (a cold start with its
  recorded working set against one without); fanout (16 restores at once on
  this host, of one image and of 4 images sharing a base: chunks fetched
  against distinct chunks, and time against one alone). --cases runs only
  those named.

postcopy bench encryption [--pages N] [--rounds R] [--seed S] [--json]
  What sealing TCP data channels costs: fault p50 and bulk GB/s over TCP,
  plaintext and sealed, interleaved R rounds (default 3); medians and ratios.

Every benchmark but the suite prints a table; --json prints its results as
JSON lines instead, one object per result, for scripts.`;

const usage = `usage: postcopy <command> [options]   (postcopy <command> --help: that command's usage)

commands:
  demo       move a real image from a source process to a destination and show what happened
  serve      serve an image to destinations
  handle     be the page-fault handler VMMs hand their userfaultfd to (Firecracker style)
  restore    restore an image (from a source, a file or a store) into memory or a file
  bench      the benchmark suite (quick; --full for everything), or one benchmark:
             latency, throughput, encryption, local, localhost, live, qemu, store
  qemu       QEMU snapshots: import a stream QEMU saved, save a running QEMU, serve a
             snapshot to a QEMU, or restore one into a QEMU started for it
  store      images in a snapshot store on S3-compatible object storage: push, ls, rm, gc

${serveUsage}

${restoreUsage}

${handleUsage}

${benchUsage}

${demoUsage}

${qemuUsage}

${storeUsage}
`;

/** What `postcopy` alone prints: the commands, and where the rest is. */
const shortUsage = usage.slice(0, usage.indexOf('\n\n', usage.indexOf('commands:'))) + "\n\npostcopy --help prints every command's usage.";

const usageOf: Record<string, string> = {
  serve: serveUsage,
  restore: restoreUsage,
  handle: handleUsage,
  bench: benchUsage,
  demo: demoUsage,
  qemu: qemuUsage,
  store: storeUsage,
};

async function bench(argv: string[]): Promise<void> {
  const which = argv[0] && !argv[0].startsWith('-') ? argv[0] : 'suite';
  if (!['suite', 'latency', 'throughput', 'encryption', 'local', 'localhost', 'live', 'qemu', 'store'].includes(which))
    throw new UsageError(`unknown benchmark ${JSON.stringify(which)} (the suite, latency, throughput, encryption, local, localhost, live, qemu or store)`);
  const rest = which === 'suite' ? argv : argv.slice(1);
  const values = parseCommandLine(rest, {
    pages: { type: 'string' },
    rounds: { type: 'string' },
    transport: { type: 'string' },
    seed: { type: 'string' },
    json: { type: 'boolean' },
    full: { type: 'boolean' },
    out: { type: 'string' },
    link: { type: 'string', multiple: true },
    clones: { type: 'string' },
    'write-rates': { type: 'string' },
    rate: { type: 'string' },
    'guest-mib': { type: 'string' },
    'chunk-sizes': { type: 'string' },
    cases: { type: 'string' },
  });
  // Each benchmark takes its own options; one given to another is refused, never ignored.
  const takes: Record<string, string[]> = {
    suite: ['pages', 'json', 'full', 'out', 'link'],
    latency: ['pages', 'rounds', 'transport', 'seed', 'json'],
    throughput: ['pages', 'rounds', 'transport', 'json'],
    encryption: ['pages', 'rounds', 'seed', 'json'],
    local: ['pages', 'rounds', 'seed', 'json'],
    localhost: ['pages', 'clones', 'json'],
    live: ['pages', 'write-rates', 'rate', 'json'],
    qemu: ['guest-mib', 'rounds', 'json'],
    store: ['pages', 'chunk-sizes', 'cases', 'json'],
  };
  const stray = Object.keys(values).find((k) => !takes[which].includes(k));
  if (stray) {
    const others = Object.keys(takes).filter((w) => takes[w].includes(stray));
    throw new UsageError(
      `--${stray} is not an option of ${which === 'suite' ? 'the bench suite' : `bench ${which}`}${others.length ? ` (it is of ${others.map((w) => (w === 'suite' ? 'the suite' : w)).join(', ')})` : ''}`,
    );
  }
  // The benchmarks (and their plotting libraries) load only when asked for: every other command starts faster.
  if (which === 'suite') {
    const { runSuite } = await import('../bench/suite.js');
    const started = Date.now();
    const { dir, report } = await runSuite({
      full: values.full === true,
      ...(values.out ? { outDir: values.out } : {}),
      ...(values.pages ? { pages: parseCount(values.pages, '--pages', 16384, 1 << 24, 1) } : {}),
      ...(values.link ? { links: values.link } : {}),
      progress: (line) => process.stderr.write(line + '\n'),
    });
    if (values.json) process.stdout.write(JSON.stringify(report) + '\n');
    else process.stdout.write(`${report.results.length} scenarios in ${((Date.now() - started) / 1000).toFixed(0)} s; report: ${join(dir, 'report.md')}\n`);
    return;
  }
  if (which === 'encryption') {
    const { encryptionBench, encryptionTable } = await import('../bench/encryption.js');
    const result = await encryptionBench(
      parseCount(values.pages, '--pages', 65536, 1 << 24, 1),
      parseCount(values.rounds, '--rounds', 3, 100, 1),
      parseCount(values.seed, '--seed', 1, 0xffffffff),
    );
    printResults([result], ([r]) => encryptionTable(r));
    return;
  }
  if (which === 'local') {
    const { localBench, localTable } = await import('../bench/local.js');
    const results = await localBench(
      parseCount(values.pages, '--pages', 65536, 1 << 24, 1024),
      parseCount(values.rounds, '--rounds', 3, 100, 1),
      parseCount(values.seed, '--seed', 1, 0xffffffff),
      (line) => process.stderr.write(line + '\n'),
    );
    printResults(results, localTable);
    return;
  }
  if (which === 'store') {
    const { storeBench, storeTable, STORE_CASES } = await import('../bench/store.js');
    const cases = values.cases?.split(',');
    const unknown = cases?.find((c) => !(STORE_CASES as readonly string[]).includes(c));
    if (unknown !== undefined) throw new UsageError(`--cases: no case "${unknown}" (the cases: ${STORE_CASES.join(', ')})`);
    const results = await storeBench({
      pages: parseCount(values.pages, '--pages', 65536, 1 << 24, 4096),
      chunkSizes: (values['chunk-sizes'] ?? '64K,128K,256K,512K').split(',').map((s) => parseSize(s, '--chunk-sizes', 4096)),
      ...(cases ? { cases: cases as (typeof STORE_CASES)[number][] } : {}),
      progress: (line) => process.stderr.write(line + '\n'),
    });
    printResults(results, storeTable);
    return;
  }
  if (which === 'qemu') {
    const { qemuBench, qemuTable } = await import('../bench/qemu.js');
    const result = await qemuBench(parseCount(values['guest-mib'], '--guest-mib', 64, 4096, 8), parseCount(values.rounds, '--rounds', 3, 100, 1), (line) =>
      process.stderr.write(line + '\n'),
    );
    printResults([result], qemuTable);
    return;
  }
  if (which === 'live') {
    const { liveBench, liveTable } = await import('../bench/live.js');
    const pages = parseCount(values.pages, '--pages', 65536, 1 << 22, 256);
    const rates = (values['write-rates'] ?? '1,10,50').split(',').map((p) => parseCount(p, '--write-rates', 1, 100, 0) / 100);
    if (values.rate !== undefined) parseRate(values.rate);
    const results = await liveBench(pages, rates, (line) => process.stderr.write(line + '\n'), values.rate);
    printResults(results, liveTable);
    return;
  }
  if (which === 'localhost') {
    const { localhostBench, localhostTable } = await import('../bench/localhost.js');
    const pages = parseCount(values.pages, '--pages', 262144, 1 << 24, 4096);
    const clones = (values.clones ?? '1,4,16').split(',').map((n) => parseCount(n, '--clones', 1, 64, 1));
    const results = await localhostBench(pages * 4096, Math.floor(pages / 4) * 4096, clones, (line) => process.stderr.write(line + '\n'));
    printResults(results, localhostTable);
    return;
  }
  const { latencyBench, throughputBench, latencyTable } = await import('../bench/latency.js');
  // "both", from before image was a transport too, still means unix,tcp.
  const transports = [
    ...new Set(
      (values.transport === 'both' ? 'unix,tcp' : (values.transport ?? 'unix,tcp'))
        .split(',')
        .map((x) => parseChoice(x, '--transport', ['unix', 'tcp', 'image'] as const, 'unix')),
    ),
  ] as Transport[];
  if (which === 'throughput' && transports.includes('image')) throw new UsageError('bench throughput streams from a source: --transport unix, tcp or unix,tcp');
  const pages = parseCount(values.pages, '--pages', which === 'latency' ? 32768 : 65536, 1 << 24, 1);
  const seed = parseCount(values.seed, '--seed', 1, 0xffffffff);
  const rounds = parseCount(values.rounds, '--rounds', 3, 100, 1);
  const results = [];
  for (const t of transports) {
    const result = which === 'latency' ? await latencyBench(pages, t, seed, rounds) : await throughputBench(pages, t as 'unix' | 'tcp', rounds);
    // A script reading JSON lines gets each transport's as soon as it is measured.
    if (values.json) process.stdout.write(JSON.stringify(result) + '\n');
    results.push(result);
  }
  if (!values.json) process.stdout.write(latencyTable(results));

  /** The one way benchmarks print: a table for people, or with --json one JSON line per result for scripts. */
  function printResults<R>(results: R[], table: (results: R[]) => string): void {
    if (values.json) for (const r of results) process.stdout.write(JSON.stringify(r) + '\n');
    else process.stdout.write(table(results));
  }
}

/** --log-level and --log-format, anywhere after the command (every command takes them). */
function takeLogOptions(argv: string[]): { level?: string; format?: LogFormat; rest: string[] } {
  const rest: string[] = [];
  let level: string | undefined;
  let format: LogFormat | undefined;
  for (let i = 0; i < argv.length; i++) {
    const m = /^--(log-level|log-format)(?:=(.*))?$/.exec(argv[i]);
    if (!m) {
      rest.push(argv[i]);
      continue;
    }
    const value = m[2] ?? argv[++i];
    if (value === undefined) throw new UsageError(`--${m[1]} needs a value`);
    if (m[1] === 'log-level') level = parseChoice(value, '--log-level', LOG_LEVELS, 'info');
    else format = parseChoice(value, '--log-format', ['json', 'pretty'] as const, 'json');
  }
  return { level, format, rest };
}

async function main(): Promise<number> {
  const command = process.argv[2];
  let argv = process.argv.slice(3);
  if (command === '--version' || command === '-v') {
    process.stdout.write(`uffd-postcopy ${packageVersion()}\n`);
    return 0;
  }
  // --help anywhere after a command: that command's usage, and nothing else is done.
  const helpAt = argv.indexOf('--');
  if (command && usageOf[command] && (helpAt < 0 ? argv : argv.slice(0, helpAt)).some((a) => a === '--help' || a === '-h')) {
    process.stdout.write(usageOf[command] + '\n');
    return 0;
  }
  let log: Logger | null = null;
  let format: LogFormat = process.stderr.isTTY ? 'pretty' : 'json';
  try {
    const logging = takeLogOptions(argv);
    argv = logging.rest;
    format =
      logging.format ?? (process.env.POSTCOPY_LOG_FORMAT === 'json' || process.env.POSTCOPY_LOG_FORMAT === 'pretty' ? process.env.POSTCOPY_LOG_FORMAT : format);
    // Children (the handler's worker, bench's processes) log the same way.
    if (logging.level) process.env.POSTCOPY_LOG_LEVEL = logging.level;
    process.env.POSTCOPY_LOG_FORMAT = format;
    // A person at a terminal (and demo and bench, which print their own report)
    // hears only about problems; services and scripts get every record as JSON.
    const quiet = process.stderr.isTTY === true || command === 'demo' || command === 'bench';
    log = createLogger({
      name: `postcopy-${command ?? 'cli'}`,
      level: logging.level ?? (process.env.POSTCOPY_LOG_LEVEL || (quiet ? 'warn' : 'info')),
      format,
      beforeWrite: clearProgress,
    });
    // Every command runs native code: without the addon, one sentence saying so (--help and --version work without it).
    if (addonError && command !== undefined && usageOf[command]) throw addonNotBuilt();
    switch (command) {
      case 'serve':
        await serve(argv, log);
        return 0;
      case 'restore':
        await restore(argv, log);
        return 0;
      case 'handle':
        await handle(argv, log);
        return 0;
      case 'demo':
        await demo(argv, log);
        return 0;
      case 'bench':
        await bench(argv);
        return 0;
      case 'qemu':
        await qemu(argv, log);
        return 0;
      case 'store':
        await store(argv, log);
        return 0;
      case undefined:
        // A mistake, not a request for help: a few lines where mistakes go, not the whole manual.
        process.stderr.write(`${shortUsage}\n`);
        return 2;
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(usage);
        return 0;
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)} (demo, serve, handle, restore, bench, qemu or store)`);
    }
  } catch (err) {
    clearProgress();
    if (err instanceof UsageError) {
      const help = usageOf[command ?? ''] ? `postcopy ${command} --help` : 'postcopy --help';
      process.stderr.write(`postcopy${usageOf[command ?? ''] ? ` ${command}` : ''}: ${err.message} (${err.code}; see ${help})\n`);
      return 2;
    }
    // One line per error: the log record when logs are JSON (scripts read them), else the sentence.
    const e = err as PostcopyError & { errno?: number; syscall?: string };
    const line = `postcopy ${command}: ${e.message}${e.code ? ` (${e.code})` : ''}`;
    if (log && format === 'json' && log.isLevelEnabled('error')) log.error({ code: e.code, errno: e.errno, syscall: e.syscall }, line);
    else process.stderr.write(line + '\n');
    return 1;
  }
}

const code = await main();
// A failed command exits now, whatever it left running (a child, a timer);
// stderr is a file or a pipe, both written synchronously on Linux.
if (code !== 0) process.exit(code);
