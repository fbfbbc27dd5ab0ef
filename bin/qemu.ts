// postcopy qemu: QEMU snapshots this project can serve (docs/QEMU-SNAPSHOT.md).
//   import FILE --out DIR   from a stream QEMU saved itself (migrate "exec:cat > FILE")
//   save --qmp PATH --out DIR   from a QEMU, stopped and migrated into a socket of ours
import { spawn } from 'node:child_process';
import { closeSync, createReadStream, existsSync, mkdtempSync, openSync, readFileSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { once } from 'node:events';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import type { Logger } from '../lib/logger.js';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { Qmp } from '../lib/qmp.js';
import { listenOwnerOnly } from '../lib/unix-socket.js';
import { readQemuStream, type QemuSnapshotManifest } from '../server/qemu-snapshot.js';
import { QemuSnapshotSource, readManifest, serveQemuSnapshot, type QemuServeReport } from '../server/qemu-source.js';
import { parseAddressOption, parseCommandLine, parseStoreOptions, parseWindow, requireOptions, storeOptionSpec, UsageError } from './options.js';
import { isStoreUrl, parseImageUrl, type ImageAddress } from '../lib/store/address.js';
import type { PushReport } from '../lib/store/snapshot-store.js';
import { fetchQemuSnapshotFiles, pushQemuSnapshot } from '../server/qemu-store.js';
import { Destination } from '../client/destination.js';
import { ChunkCache } from '../lib/store/chunk-cache.js';
import { SnapshotStore } from '../lib/store/snapshot-store.js';
import type { ServedRegionSpec } from '../lib/native.js';

export async function qemu(argv: string[], log: Logger): Promise<void> {
  const [which, ...rest] = argv;
  if (which === 'import') return importStream(rest, log);
  if (which === 'save') return save(rest, log);
  if (which === 'serve') return serveSnapshot(rest, log);
  if (which === 'restore') return restoreSnapshot(rest, log);
  throw new UsageError(
    which === undefined
      ? 'postcopy qemu takes a command: import, save, serve or restore'
      : `postcopy qemu takes import, save, serve or restore, not ${JSON.stringify(which)}`,
  );
}

const serveOptionSpec = {
  snapshot: { type: 'string' },
  window: { type: 'string' },
  'no-background': { type: 'boolean' },
  json: { type: 'boolean' },
} as const;

async function restoreSnapshot(argv: string[], log: Logger): Promise<void> {
  const split = argv.indexOf('--');
  if (split < 0 || split === argv.length - 1) throw new UsageError('postcopy qemu restore --snapshot DIR -- QEMU-COMMAND...: give the QEMU command after --');
  const values = parseCommandLine(argv.slice(0, split), { ...serveOptionSpec, wait: { type: 'boolean' }, ...storeOptionSpec });
  requireOptions(values, ['snapshot'], 'postcopy qemu restore --snapshot DIR -- QEMU-COMMAND...');
  const inStore = isStoreUrl(values.snapshot as string);
  const { cache, tenant } = parseStoreOptions(values, inStore);
  if (!inStore) return restoreFrom(argv, values, values.snapshot as string, log, () => {});
  // A snapshot in a store: its device state is fetched first (QEMU needs it whole to start); its RAM is restored
  // into this process's memory by a store session as QEMU reads it: a page QEMU asks for that is not here yet
  // faults in that session's engine, which fetches its chunk (through the host's cache, checked), while the
  // session's background fetches the rest. Once QEMU has every page, the memory is checked against the image's digest.
  const at = storeImageAddress(values.snapshot as string, '--snapshot');
  const files = mkdtempSync(join(tmpdir(), 'uffd-postcopy-qemu-snapshot-'));
  const removeFiles = () => rmSync(files, { recursive: true, force: true });
  const store = new SnapshotStore(at, { logger: log, ...(tenant ? { tenant } : {}) });
  const chunkCache = new ChunkCache({ ...cache, logger: log });
  try {
    const manifest = await fetchQemuSnapshotFiles(store, at.name, files, chunkCache, log);
    const ram = await Destination.connect({ storeImage: { store, name: at.name, manifest }, cache: chunkCache, logger: log });
    try {
      const blocks = ram.regions.map((r) => ({
        source: r.mapping.handle,
        sourceIsMapping: true,
        offset: 0,
        length: r.mapping.length,
        pageSize: r.info.pageSize,
      }));
      // What came from the store for the RAM: in all, and by the time the guest ran (a lazy restore: little).
      const before = store.objects.stats.bytesFetched;
      const fromStore = { ramBytes: blocks.reduce((n, b) => n + b.length, 0), fetchedBytesWhenRunning: 0, fetchedBytes: 0 };
      const running = () => (fromStore.fetchedBytesWhenRunning = store.objects.stats.bytesFetched - before);
      // Once QEMU has every page, this copy is checked and let go at once (never kept while QEMU runs on, --wait or not).
      const served = async () => {
        await ram.finish();
        fromStore.fetchedBytes = store.objects.stats.bytesFetched - before;
        log.info(fromStore, "the guest's RAM as served equals the image in the store");
        ram.close();
        return { fromStore };
      };
      // QEMU gone mid-restore (or an interrupt): the stream's threads may be blocked on a page of this memory that only a
      // turn of the event loop would fetch. Closing the session's userfaultfd lets them go (they read zeros, sent nowhere);
      // the memory stays mapped until the process exits, as they may still be reading it.
      const abandon = () => ram.close({ keepMemory: true });
      await restoreFrom(argv, values, files, log, removeFiles, { blocks, running, served, abandon });
    } finally {
      ram.close();
    }
  } finally {
    store.close();
    removeFiles();
  }
}

async function restoreFrom(
  argv: string[],
  values: { window?: string; 'no-background'?: boolean; json?: boolean; wait?: boolean },
  snapshot: string,
  log: Logger,
  cleanUp: () => void,
  fromMemory?: { blocks: ServedRegionSpec[]; running: () => void; served: () => Promise<Record<string, unknown>>; abandon: () => void },
): Promise<void> {
  const split = argv.indexOf('--');
  const window = parseWindow(values.window);
  const manifest = readManifest(snapshot); // a directory that is not a snapshot is refused before QEMU starts
  const [command, ...args] = argv.slice(split + 1);
  checkRamSize(manifest, args);
  const dir = mkdtempSync(join(tmpdir(), 'uffd-postcopy-qemu-'));
  const qmpPath = join(dir, 'qmp.sock');
  const incoming = join(dir, 'incoming.sock');
  const wait = values.wait === true;
  // QEMU outlives this command (unless --wait): its output goes to a log beside its sockets, never to our stdout.
  const logPath = join(dir, 'qemu.log');
  const logFd = openSync(logPath, 'a', 0o600);
  const child = spawn(command, [...args, '-incoming', 'defer', '-qmp', `unix:${qmpPath},server=on,wait=off`], {
    stdio: ['ignore', logFd, logFd],
    detached: !wait,
  });
  closeSync(logFd);
  const qemuSaid = () => {
    try {
      return readFileSync(logPath, 'utf8').trim().split('\n').slice(-3).join(' | ');
    } catch {
      return '';
    }
  };
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const failedToStart = new Promise<never>((_, reject) =>
    child.once('error', (err: NodeJS.ErrnoException) =>
      reject(Object.assign(new PostcopyError(ErrorCode.QMP_FAILED, `cannot start ${command}: ${err.message}`), { errno: err.errno, syscall: err.syscall })),
    ),
  );
  failedToStart.catch(() => {});
  // Interrupted while QEMU is ours (until its restore is done, and all along with --wait): QEMU is stopped, its
  // directory removed, and nothing is left running.
  const interrupted = (signal: NodeJS.Signals) => {
    child.kill('SIGKILL');
    fromMemory?.abandon();
    rmSync(dir, { recursive: true, force: true });
    cleanUp();
    process.stderr.write(`postcopy qemu restore: interrupted (${signal}): QEMU (pid ${child.pid}) was stopped and its directory ${dir} removed\n`);
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  const letGo = () => {
    process.off('SIGINT', interrupted);
    process.off('SIGTERM', interrupted);
  };
  process.once('SIGINT', interrupted);
  process.once('SIGTERM', interrupted);
  let source: QemuSnapshotSource | null = null;
  try {
    // Opened while QEMU starts: from migrate-incoming on, only the connection and the stream are left.
    source = new QemuSnapshotSource(snapshot, fromMemory?.blocks);
    for (let i = 0; i < 1000 && !existsSync(qmpPath); i++) {
      if (child.exitCode !== null)
        throw new PostcopyError(ErrorCode.QMP_FAILED, `${command} exited with ${child.exitCode} before its monitor opened: ${qemuSaid()}`);
      await Promise.race([new Promise((r) => setTimeout(r, 10)), failedToStart]);
    }
    const qmp = await Qmp.connect(qmpPath);
    try {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] });
      await qmp.execute('migrate-incoming', { uri: `unix:${incoming}` });
    } finally {
      qmp.close();
    }
    for (let i = 0; i < 1000 && !existsSync(incoming); i++) await new Promise((r) => setTimeout(r, 10));
    const report = await source.serve(`unix:${incoming}`, {
      logger: log,
      ...(window ? { window } : {}),
      background: !values['no-background'],
      ...(fromMemory ? { onRunning: fromMemory.running, onFailure: fromMemory.abandon } : {}),
    });
    source.close();
    source = null;
    const more = await fromMemory?.served();
    printServeReport({ ...report, ...more, qmp: qmpPath, pid: child.pid, log: logPath, ...(wait ? {} : { dir }) }, values.json === true, log);
    if (wait) {
      const code = await exited;
      log.info({ code }, 'QEMU exited');
      letGo();
      rmSync(dir, { recursive: true, force: true });
    } else {
      letGo();
      child.unref(); // its monitor and log stay in `dir` while it runs
    }
  } catch (err) {
    source?.close();
    letGo();
    child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
    const said = qemuSaid();
    if (said && err instanceof Error && !err.message.includes(said)) err.message += ` (QEMU: ${said})`;
    throw err;
  }
}

/**
 * Refuses, before QEMU starts, a command whose -m differs from the
 * snapshot's RAM (its main RAM block, pc.ram and the like): QEMU would only
 * fail the migration once it started, with ERR_PEER_GONE here.
 */
function checkRamSize(manifest: QemuSnapshotManifest, args: string[]): void {
  const at = args.lastIndexOf('-m');
  if (at < 0 || at === args.length - 1) return;
  const value = /^(?:size=)?(\d+(?:\.\d+)?)([KMGT]?)B?(?:,.*)?$/i.exec(args[at + 1]);
  if (!value) return;
  const asked = Math.round(Number(value[1]) * 1024 ** ({ '': 2, K: 1, M: 2, G: 3, T: 4 } as Record<string, number>)[value[2].toUpperCase()]);
  const ram = manifest.blocks.find((b) => /(^|\.)ram$/.test(b.name) && !b.name.includes('rom'));
  if (!ram || ram.length === asked) return;
  const mib = (n: number) => `${n / 2 ** 20}M`;
  throw new UsageError(
    `the snapshot's guest has ${mib(ram.length)} of RAM (block ${ram.name}), the QEMU command asks -m ${args[at + 1]}: give -m ${mib(ram.length)} (the machine the snapshot was taken of)`,
  );
}

async function serveSnapshot(argv: string[], log: Logger): Promise<void> {
  const values = parseCommandLine(argv, { ...serveOptionSpec, connect: { type: 'string' } });
  requireOptions(values, ['snapshot', 'connect'], 'postcopy qemu serve --snapshot DIR --connect unix:PATH|tcp:HOST:PORT');
  parseAddressOption(values.connect as string, '--connect');
  const window = parseWindow(values.window);
  const report = await serveQemuSnapshot(values.snapshot as string, values.connect as string, {
    logger: log,
    ...(window ? { window } : {}),
    background: !values['no-background'],
  });
  printServeReport(report, values.json === true, log);
}

function printServeReport(
  report: QemuServeReport & {
    qmp?: string;
    pid?: number;
    log?: string;
    dir?: string;
    fromStore?: { ramBytes: number; fetchedBytesWhenRunning: number; fetchedBytes: number };
  },
  json: boolean,
  log: Logger,
): void {
  log.info(report, 'the destination QEMU has every page');
  if (json) {
    process.stdout.write(JSON.stringify(report) + '\n');
    return;
  }
  const mib = (n: number) => (n / 2 ** 20).toFixed(1);
  process.stdout.write(
    [
      `requests     ${report.requests}   latency p50 ${report.requestLatencyUs.p50} µs   p90 ${report.requestLatencyUs.p90} µs   p99 ${report.requestLatencyUs.p99} µs`,
      `pages        on demand ${report.pagesOnDemand}   window ${report.pagesWindow}   background ${report.pagesBackground}   zero ${report.zeroPages}`,
      `sent         ${mib(report.bytesSent)} MiB`,
      `guest runs   after ${report.guestRunningMs} ms;  every page there after ${report.fullResidencyMs} ms`,
      ...(report.fromStore
        ? [
            `store        ${mib(report.fromStore.fetchedBytesWhenRunning)} MiB of ${mib(report.fromStore.ramBytes)} MiB of RAM fetched when the guest ran; ${mib(report.fromStore.fetchedBytes)} MiB in all`,
          ]
        : []),
      ...(report.qmp ? [`QEMU         pid ${report.pid}, its monitor at ${report.qmp}, its output in ${report.log}`] : []),
      ...(report.dir ? [`             remove ${report.dir} once QEMU has exited (it runs on without this command)`] : []),
      '',
    ].join('\n'),
  );
}

function progress(log: Logger) {
  return (bytes: number, pages: number) => log.info({ mib: Math.round(bytes / 2 ** 20), pages }, 'reading the migration stream');
}

async function importStream(argv: string[], log: Logger): Promise<void> {
  const [file, ...options] = argv;
  if (!file || file.startsWith('-')) throw new UsageError('postcopy qemu import FILE --out DIR: name the stream file first');
  const values = parseCommandLine(options, { out: { type: 'string' }, 'tenant-key-file': { type: 'string' } });
  requireOptions(values, ['out'], 'postcopy qemu import FILE --out DIR');
  const target = snapshotTarget(values.out as string, values['tenant-key-file']);
  const stream = createReadStream(file, { highWaterMark: 1 << 20 });
  const failedOpen = new Promise<never>((_, reject) =>
    stream.once('error', (err: NodeJS.ErrnoException) =>
      reject(
        Object.assign(new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `cannot read ${file}: ${err.message}`), { errno: err.errno, syscall: err.syscall }),
      ),
    ),
  );
  try {
    const manifest = await Promise.race([readQemuStream(stream, target.dir, { progress: progress(log) }), failedOpen]);
    report({ ...manifest, ...(await target.written(log)) }, values.out as string, log);
  } finally {
    target.done();
  }
}

/**
 * Where a snapshot is written: a directory, or (--out s3://BUCKET/PREFIX/NAME)
 * a temporary one pushed to a store once whole, sealed with the tenant's key
 * in `tenantKeyFile` when given.
 */
function snapshotTarget(out: string, tenantKeyFile?: string): { dir: string; written(log: Logger): Promise<{ pushed?: PushReport }>; done(): void } {
  const { tenant } = parseStoreOptions({ 'tenant-key-file': tenantKeyFile }, isStoreUrl(out));
  if (!isStoreUrl(out)) {
    // Written beside it and renamed into place once whole: a stream cut short leaves no half snapshot under --out.
    let stat: ReturnType<typeof statSync>;
    try {
      stat = statSync(out, { throwIfNoEntry: false });
    } catch (err) {
      throw new UsageError(`--out ${out}: ${(err as NodeJS.ErrnoException).code === 'ENOTDIR' ? 'a part of the path is a file' : (err as Error).message}`);
    }
    if (stat && !stat.isDirectory()) throw new UsageError(`--out ${out}: is a file; a snapshot is a directory`);
    if (stat && readdirSync(out).length > 0) throw new UsageError(`--out ${out}: the directory is not empty (a snapshot is written to a new or empty one)`);
    const parent = dirname(resolve(out));
    if (!statSync(parent, { throwIfNoEntry: false })?.isDirectory()) throw new UsageError(`--out ${out}: the directory ${parent} does not exist`);
    const partial = mkdtempSync(join(parent, `.${basename(resolve(out))}.partial-`));
    let whole = false;
    return {
      dir: partial,
      written: async () => {
        renameSync(partial, out); // over an empty directory too
        whole = true;
        return {};
      },
      done: () => {
        if (!whole) rmSync(partial, { recursive: true, force: true });
      },
    };
  }
  const at = storeImageAddress(out, '--out');
  const dir = mkdtempSync(join(tmpdir(), 'uffd-postcopy-qemu-snapshot-'));
  return {
    dir,
    written: async (log) => ({ pushed: await pushQemuSnapshot(dir, at, log, tenant) }),
    done: () => rmSync(dir, { recursive: true, force: true }),
  };
}

function storeImageAddress(text: string, what: string): ImageAddress {
  try {
    return parseImageUrl(text);
  } catch (err) {
    throw new UsageError(`${what} ${(err as Error).message}`);
  }
}

async function save(argv: string[], log: Logger): Promise<void> {
  const values = parseCommandLine(argv, {
    qmp: { type: 'string' },
    out: { type: 'string' },
    'leave-running': { type: 'boolean' },
    live: { type: 'boolean' },
    'tenant-key-file': { type: 'string' },
  });
  requireOptions(values, ['qmp', 'out'], 'postcopy qemu save --qmp PATH --out DIR [--leave-running] [--live]');
  const target = snapshotTarget(values.out as string, values['tenant-key-file']);
  const live = values.live === true;
  const qmp = await Qmp.connect(values.qmp as string).catch((err) => {
    target.done();
    throw err;
  });
  const dir = mkdtempSync(join(tmpdir(), 'uffd-postcopy-qemu-'));
  const socketPath = join(dir, 'migration.sock');
  const server = createServer();
  let socket: Socket | undefined;
  let wasRunning = false;
  let stopped = false;
  try {
    const version = await qmp.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version');
    const qemuVersion = `${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro}`;
    wasRunning = (await qmp.execute<{ running: boolean }>('query-status')).running === true;
    // A snapshot is one instant: the guest stops before its first page is read (as virsh save does), so its
    // memory and its device state are of the same moment. A live save copies memory the guest keeps writing.
    if (wasRunning && !live) {
      await qmp.execute('stop');
      stopped = true;
      log.info({ qmp: values.qmp }, 'the guest is stopped for the save');
    } else if (wasRunning) {
      log.warn({ qmp: values.qmp }, "a live save: the guest runs while its memory is read; the snapshot is only as consistent as QEMU's dirty-page tracking");
    }
    await listenOwnerOnly(server, socketPath);
    const accepted = once(server, 'connection') as Promise<[Socket]>;
    await qmp.execute('migrate', { uri: `unix:${socketPath}` });
    log.info({ qmp: values.qmp, qemuVersion, live: live && wasRunning }, 'QEMU migrates into this process');
    [socket] = await Promise.race([
      accepted,
      new Promise<never>((_, reject) => setTimeout(() => reject(new PostcopyError(ErrorCode.TIMEOUT, 'QEMU did not connect to migrate')), 10_000).unref()),
    ]);
    const manifest = await readQemuStream(socket, target.dir, { qemuVersion, progress: progress(log) });
    // QEMU says the migration completed once it has sent everything: wait for its word (bounded; the stream is whole already).
    await qmp.untilMigration(['completed'], 30_000, 100).catch((err) => {
      if ((err as PostcopyError).code !== ErrorCode.TIMEOUT) throw err;
    });
    // The guest stays paused (as after any migration) unless asked to go on.
    const leaveRunning = values['leave-running'] === true && wasRunning;
    if (leaveRunning) {
      await qmp.execute('cont');
      log.info('the guest runs again');
    }
    report({ ...manifest, guest: leaveRunning ? 'running' : 'paused', live: live && wasRunning, ...(await target.written(log)) }, values.out as string, log);
  } catch (err) {
    // A save that failed leaves the guest as it found it.
    if (stopped) {
      await qmp.execute('migrate_cancel').catch(() => {});
      await qmp.execute('cont').catch((e: Error) => log.error({ err: e.message }, 'the save failed and the guest could not be resumed'));
    }
    throw err;
  } finally {
    socket?.destroy();
    server.close();
    qmp.close();
    rmSync(dir, { recursive: true, force: true });
    target.done();
  }
}

function report(manifest: QemuSnapshotManifest & { guest?: 'running' | 'paused'; live?: boolean; pushed?: PushReport }, out: string, log: Logger): void {
  const pages = manifest.blocks.reduce((n, b) => n + b.dataPages, 0);
  log.info({ out, machine: manifest.machine, blocks: manifest.blocks.length, dataPages: pages }, 'QEMU snapshot written');
  process.stdout.write(JSON.stringify({ snapshot: out, ...manifest }) + '\n');
}
