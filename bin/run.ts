// Running one command of the CLI, once bin/postcopy.ts has ruled out help and
// the version: logging set up as asked, the command's module loaded (only
// that one: a restore never loads the QEMU, store or bench code), its errors
// turned into one line and an exit code.
import { addonError, addonNotBuilt } from '../lib/native.js';
import { LOG_LEVELS, createLogger, type LogFormat, type Logger } from '../lib/logger.js';
import { clearProgress } from './terminal.js';
import { PostcopyError } from '../lib/errors.js';
import type { Transport } from '../bench/latency.js';
import { parseChoice, parseChoices, parseCommandLine, parseCount, parseRate, parseSize, UsageError } from './options.js';
import { join } from 'node:path';
import { usageOf } from './usage.js';

async function bench(argv: string[]): Promise<void> {
  const which = argv[0] && !argv[0].startsWith('-') ? argv[0] : 'suite';
  if (!['suite', 'latency', 'throughput', 'encryption', 'compression', 'fanout', 'local', 'localhost', 'live', 'qemu', 'store'].includes(which))
    throw new UsageError(
      `unknown benchmark ${JSON.stringify(which)} (the suite, latency, throughput, encryption, compression, fanout, local, localhost, live, qemu or store)`,
    );
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
    images: { type: 'string' },
    destinations: { type: 'string' },
  });
  // Each benchmark takes its own options; one given to another is refused, never ignored.
  const takes: Record<string, string[]> = {
    suite: ['pages', 'rounds', 'json', 'full', 'out', 'link'],
    latency: ['pages', 'rounds', 'transport', 'seed', 'json'],
    throughput: ['pages', 'rounds', 'transport', 'json'],
    encryption: ['pages', 'rounds', 'seed', 'json'],
    compression: ['pages', 'rounds', 'images', 'json'],
    fanout: ['pages', 'destinations', 'rounds', 'transport', 'json'],
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
      rounds: parseCount(values.rounds, '--rounds', 1, 100, 1),
      progress: (line) => process.stderr.write(line + '\n'),
    });
    // The headline: one JSON line per link, pattern and threads, or a table; everything else is in the report.
    if (values.json) for (const row of report.headline) process.stdout.write(JSON.stringify(row) + '\n');
    else {
      const { headlineTable } = await import('../bench/report.js');
      process.stdout.write(headlineTable(report.headline));
      process.stdout.write(`${report.results.length} scenarios in ${((Date.now() - started) / 1000).toFixed(0)} s; report: ${join(dir, 'report.md')}\n`);
    }
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
  if (which === 'compression') {
    const { compressionBench, compressionTable, IMAGE_KINDS } = await import('../bench/compression.js');
    const kinds = parseChoices(values.images, '--images', IMAGE_KINDS, IMAGE_KINDS);
    const results = await compressionBench(
      parseCount(values.pages, '--pages', 65536, 1 << 24, 256),
      parseCount(values.rounds, '--rounds', 3, 100, 1),
      kinds,
      (line) => process.stderr.write(line + '\n'),
    );
    printResults(results, compressionTable);
    return;
  }
  if (which === 'fanout') {
    const { fanoutBench, fanoutTable, FANOUT_TRANSPORTS } = await import('../bench/fanout.js');
    const transports = parseChoices(values.transport, '--transport', FANOUT_TRANSPORTS, FANOUT_TRANSPORTS);
    const results = await fanoutBench(
      parseCount(values.pages, '--pages', 16384, 1 << 22, 256),
      parseCount(values.destinations, '--destinations', 16, 64, 2),
      parseCount(values.rounds, '--rounds', 3, 100, 1),
      transports,
      (line) => process.stderr.write(line + '\n'),
    );
    printResults(results, fanoutTable);
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
  const transports: Transport[] = parseChoices(values.transport === 'both' ? 'unix,tcp' : values.transport, '--transport', ['unix', 'tcp', 'image'] as const, [
    'unix',
    'tcp',
  ]);
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

/** Runs `command` with `argv`; resolves with the exit code (0, 1 for a failure, 2 for a usage mistake). */
export async function run(command: string, argv: string[]): Promise<number> {
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
        await (await import('./serve.js')).serve(argv, log);
        return 0;
      case 'restore':
        await (await import('./restore.js')).restore(argv, log);
        return 0;
      case 'handle':
        await (await import('./handle.js')).handle(argv, log);
        return 0;
      case 'demo':
        await (await import('./demo.js')).demo(argv, log);
        return 0;
      case 'bench':
        await bench(argv);
        return 0;
      case 'qemu':
        await (await import('./qemu.js')).qemu(argv, log);
        return 0;
      case 'store':
        await (await import('./store.js')).store(argv, log);
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
