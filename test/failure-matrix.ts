// The failure matrix: every delivery mode against every failure the tests can
// inject, each cell run end to end with real processes (`postcopy serve`,
// `restore`, `handle`, the C VMM fixture) and real sockets. A cell passes when
// it ends byte-exact, or ends with the coded failure the user asked for
// (--give-up-after: a non-zero exit and nothing written for a restore, SIGBUS
// for a VMM), or is refused at start with a coded error naming the combination.
// No cell may hang: each has a bound, and a cell that runs past it fails.
//
// Where a failure strikes is chosen at random (seeded): link faults by the
// byte offset a channel has carried, process kills by the bytes sent down all
// channels so far. test/failure-matrix.test.ts runs every cell once (CI);
// test/failure-matrix.soak.ts runs them at many points.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { Test } from 'tap';
import { FaultProxy, type Direction } from './fault-proxy.js';
import { PAGE, buildFixture, cliCommand, randomImage, reserveHugePages, tempDir, until, writeImage } from './helpers.js';
import { seededRandom } from './cut-points.js';
import { freshBucket, ownGateway } from './store/env.js';
import { LINKS, namespaceLink } from '../bench/links.js';

export const FAILURES = ['source-restarted', 'source-lost', 'link-cut', 'link-blackholed', 'worker-killed', 'supervisor-killed'] as const;
export type Failure = (typeof FAILURES)[number];

/** The image every cell moves: 8 MiB (4 huge pages), every 7th page zero. */
export const MATRIX_PAGES = 2048;

/** What a cell expects when its failure does not apply, or is refused by design. */
export interface NotACell {
  why: string;
  /** Not by design: an open defect the cell would show (held out so that CI does not flake on it). */
  open?: true;
}

export interface Mode {
  name: string;
  /** Who receives the pages: the restore CLI, or a VMM through the handle CLI. */
  destination: 'restore' | 'vmm';
  /** The source's transport: unix (unsealed), or TCP (sealed, with a token). */
  transport: 'unix' | 'tcp';
  /** The image lives in shared memory (/dev/shm): in place and release-as-sent. */
  sharedMemoryImage?: boolean;
  /** A second source serving the same image (replicas). */
  replica?: boolean;
  /** No link to fault: the memory is passed as fds and nothing crosses a socket. */
  noLink?: boolean;
  serveArgs?: string[];
  restoreArgs?: string[];
  handleArgs?: string[];
  vmmArgs?: string[];
  /** A live source: `serve --live` moving a running workload (the VMM fixture in source mode). */
  live?: boolean;
  /** No source process: the image is in a snapshot store (a gateway of the cell's own, on the real Ceph RGW), restored with --image s3://. */
  store?: boolean;
  /**
   * The source in a network namespace of the cell's own, across a veth pair
   * shaped to this link (bench/links.ts): its bulk channel crosses a link, so
   * it is paced (addon/background_pacer.h) and may pack its runs. The fault
   * proxy sits on this side of the link.
   */
  link?: 'veth-1g';
  /** Huge pages the mode needs reserved (vm.nr_hugepages). */
  hugePages?: number;
  /** Once per run before its cells: e.g. record a working set to replay. */
  prepare?: (dir: string, imagePath: string, source: string) => Promise<void>;
  /** Cells that do not apply to this mode, and why. */
  notCells?: Partial<Record<Failure, NotACell>>;
}

const HANDLER_ONLY: NotACell = { why: 'no handler process: the restore serves its own faults' };

export const MODES: readonly Mode[] = [
  { name: 'copy', destination: 'restore', transport: 'unix', notCells: { 'worker-killed': HANDLER_ONLY, 'supervisor-killed': HANDLER_ONLY } },
  { name: 'sealed TCP', destination: 'restore', transport: 'tcp', notCells: { 'worker-killed': HANDLER_ONLY, 'supervisor-killed': HANDLER_ONLY } },
  {
    name: 'across a 1 Gbit/s link (paced)',
    destination: 'restore',
    transport: 'tcp',
    link: 'veth-1g',
    notCells: { 'worker-killed': HANDLER_ONLY, 'supervisor-killed': HANDLER_ONLY },
  },
  {
    name: 'replicas',
    destination: 'restore',
    transport: 'unix',
    replica: true,
    notCells: { 'worker-killed': HANDLER_ONLY, 'supervisor-killed': HANDLER_ONLY },
  },
  {
    name: 'working-set replay',
    destination: 'restore',
    transport: 'unix',
    restoreArgs: ['--workload', 'cold-start', '--seed', '2'],
    async prepare(dir, _imagePath, source) {
      const recorded = await runCliToEnd(['restore', '--source', source, '--workload', 'cold-start', '--seed', '1', '--record-working-set', join(dir, 'set')]);
      if (recorded.code !== 0) throw new Error(`recording the working set failed: ${recorded.stderr}`);
    },
    notCells: { 'worker-killed': HANDLER_ONLY, 'supervisor-killed': HANDLER_ONLY },
  },
  {
    name: 'in place',
    destination: 'restore',
    transport: 'unix',
    sharedMemoryImage: true,
    noLink: true,
    restoreArgs: ['--in-place'],
    notCells: {
      'link-cut': { why: 'no link: the source passes its memory as fds and no page crosses a socket' },
      'link-blackholed': { why: 'no link: the source passes its memory as fds and no page crosses a socket' },
      'worker-killed': HANDLER_ONLY,
      'supervisor-killed': HANDLER_ONLY,
    },
  },
  {
    name: 'release-as-sent',
    destination: 'restore',
    transport: 'unix',
    sharedMemoryImage: true,
    serveArgs: ['--release-as-sent'],
    notCells: { 'worker-killed': HANDLER_ONLY, 'supervisor-killed': HANDLER_ONLY },
  },
  {
    name: 'live',
    destination: 'restore',
    transport: 'unix',
    live: true,
    notCells: {
      'worker-killed': HANDLER_ONLY,
      'supervisor-killed': HANDLER_ONLY,
    },
  },
  {
    name: 'store',
    destination: 'restore',
    transport: 'tcp',
    store: true,
    notCells: { 'worker-killed': HANDLER_ONLY, 'supervisor-killed': HANDLER_ONLY },
  },
  { name: 'handler from a store', destination: 'vmm', transport: 'tcp', store: true },
  { name: 'handler (copy)', destination: 'vmm', transport: 'unix' },
  { name: 'handler over sealed TCP', destination: 'vmm', transport: 'tcp' },
  { name: 'handler across a 1 Gbit/s link (paced)', destination: 'vmm', transport: 'tcp', link: 'veth-1g' },
  { name: 'MINOR', destination: 'vmm', transport: 'unix', vmmArgs: ['--memfd'] },
  { name: 'huge pages', destination: 'vmm', transport: 'unix', vmmArgs: ['--hugetlb'], hugePages: 4 },
  {
    name: 'templates',
    destination: 'vmm',
    transport: 'unix',
    handleArgs: ['--template', 'matrix'],
    vmmArgs: ['--template'],
    notCells: {
      // Not survived yet: no supervisor holds a template's clones, so a killed template handler leaves them waiting.
      'worker-killed': { why: 'a template runs in one process (it holds the shared memory), with no supervisor: there is no worker to kill' },
      'supervisor-killed': { why: 'a template runs in one process with no supervisor; killing it is not survived yet (its clones wait)' },
    },
  },
];

/** Where a cell's failure strikes. */
export interface CutPoint {
  /** Link faults: the direction and byte offset on the first channel to carry it; kills: bytes sent down in all. */
  direction: Direction;
  afterBytes: number;
  action: 'fin' | 'rst' | 'blackhole';
  /** Link faults: which of the connections open once the transfer runs (modulo how many). */
  connection: number;
}

/**
 * A random point while pages are still due. Kills strike once 2-40% of the
 * image went down. Link faults strike on one of the connections open once the
 * transfer runs (64 KiB down: past every handshake), `afterBytes` more bytes
 * on it: log-uniform, so small offsets cut control frames and requests, large
 * ones page streams.
 */
export function cutPoint(failure: Failure, random: (n: number) => number): CutPoint {
  const image = MATRIX_PAGES * PAGE;
  if (failure !== 'link-cut' && failure !== 'link-blackholed')
    return { direction: 'down', afterBytes: Math.floor(image * (0.02 + random(380) / 1000)), action: 'fin', connection: 0 };
  const action = failure === 'link-blackholed' ? 'blackhole' : random(2) ? 'fin' : 'rst';
  const up = random(4) === 0;
  const limit = up ? 4096 : image * 0.4;
  const afterBytes = Math.max(1, Math.floor(Math.exp((random(10_000) / 10_000) * Math.log(limit))));
  return { direction: up ? 'up' : 'down', afterBytes, action, connection: random(3) };
}

/** Down bytes after which the transfer runs (every handshake is over). */
const UNDERWAY_BYTES = 64 << 10;

export interface CellResult {
  /** What happened, in one word: exact (byte-exact), gave-up (the coded failure asked for), refused. */
  outcome: 'exact' | 'gave-up' | 'refused' | 'wrong';
  detail: string;
  /** The failure struck while pages were still due (false: the transfer was over first). */
  struck: boolean;
}

interface Serve {
  child: ChildProcess;
  args: string[];
  /** Where it listens: "unix:PATH" or "tcp:HOST:PORT". */
  address: string;
  /** How it was started (a restart starts it so again). */
  wrap: string[];
  host: string;
}

/** `postcopy serve ARGS`, resolved once it listens (on `host`, for TCP); killed at teardown. `wrap` prefixes the command (ip netns exec NS). */
function startServe(t: Test, args: string[], wrap: string[] = [], host = '127.0.0.1'): Promise<Serve> {
  const [cmd, ...pre] = [...wrap, ...cliCommand()];
  const child = spawn(cmd, [...pre, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => void child.kill('SIGKILL'));
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  return new Promise((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d) => {
      out += d;
      if (!out.includes('\n')) return;
      const { listening } = JSON.parse(out.split('\n')[0]) as { listening: { kind: string; path?: string; port?: number } };
      resolve({ child, args, wrap, host, address: listening.kind === 'unix' ? `unix:${listening.path}` : `tcp:${host}:${listening.port}` });
    });
    child.once('exit', (code) => reject(new Error(`serve ${args.join(' ')} exited with ${code}: ${stderr}`)));
  });
}

async function kill(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const closed = once(child, 'exit');
  child.kill('SIGKILL');
  await closed;
}

/** `postcopy ARGS` to its end, bounded. */
export function runCliToEnd(args: string[], timeoutMs = 60_000): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }> {
  const [cmd, ...pre] = cliCommand();
  const child = spawn(cmd, [...pre, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  return once(child, 'close').then(([code, signal]) => {
    clearTimeout(timer);
    return { code: code as number | null, signal: signal as string | null, stdout, stderr };
  });
}

/** A child's JSON log lines on stderr, and a way to wait (bounded) for one. */
function logsOf(child: ChildProcess) {
  const lines: Record<string, unknown>[] = [];
  const waiters: { test: (l: Record<string, unknown>) => boolean; resolve: (l: Record<string, unknown>) => void }[] = [];
  createInterface({ input: child.stderr! }).on('line', (line) => {
    if (!line.startsWith('{')) return;
    let l: Record<string, unknown>;
    try {
      l = JSON.parse(line);
    } catch {
      return;
    }
    lines.push(l);
    for (const w of [...waiters])
      if (w.test(l)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(l);
      }
  });
  const wait = (what: string, test: (l: Record<string, unknown>) => boolean, timeoutMs = 30_000) => {
    const seen = lines.find(test);
    if (seen) return Promise.resolve(seen);
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
      waiters.push({
        test,
        resolve: (l) => {
          clearTimeout(timer);
          resolve(l);
        },
      });
    });
  };
  return { lines, wait };
}

/** What a cell moves pages from, as the destination is told, and how the cell fails it. */
interface SourceUnderTest {
  /** The destination's options naming it (--source ... or --image s3://...). */
  sourceArgs: string[];
  /** More environment for the destination (the store's endpoint: the proxy in front of it). */
  env: Record<string, string>;
  /** Every link goes through it (null: no link to fault). */
  proxy: FaultProxy | null;
  /** Where it is reached without the proxy. */
  firstAddress: string;
  /** Killed (-9) and started again where it was. */
  restart(): Promise<void>;
  /** Killed (-9) for good, with every replica. */
  loseAll(): Promise<void>;
}

/** `postcopy serve` (and a replica, for that mode) behind the fault proxy. */
async function serveSource(
  t: Test,
  mode: Mode,
  dir: string,
  serveArgs: (address: string) => string[],
  listen: (name: string) => string,
  live: { socket: string; dump: string } | null,
  imagePath: string,
): Promise<SourceUnderTest> {
  // Across a link: serve in a namespace of the cell's own, with a token (it listens beyond loopback).
  let across: { wrap: string[]; host: string; tokenArgs: string[] } | null = null;
  if (mode.link) {
    const link = namespaceLink(LINKS.find((l) => l.name === mode.link)!);
    if ('skipped' in link) throw new Error(`${mode.name}: ${link.skipped}`);
    t.teardown(() => link.remove());
    const tokenFile = join(dir, 'token');
    writeFileSync(tokenFile, randomBytes(16).toString('hex'), { mode: 0o600 });
    across = { wrap: ['ip', 'netns', 'exec', link.ns], host: link.peerAddress, tokenArgs: ['--token-file', tokenFile] };
  }
  const listenAt = (name: string) => (across ? `tcp:${across.host}:0` : listen(name));
  const serveWith = (address: string) => [...serveArgs(address), ...(across?.tokenArgs ?? [])];
  const firstServe = startServe(t, serveWith(listenAt('source.sock')), across?.wrap, across?.host);
  if (live) {
    await until('serve --live to listen for its workload', () => existsSync(live.socket), 30_000);
    const workload = spawn(
      buildFixture('vmm'),
      ['--live-source', live.socket, '--image', imagePath, '--write-rate', '2000', '--threads', '1', '--dump', live.dump],
      {
        stdio: ['ignore', 'ignore', 'inherit'],
      },
    );
    t.teardown(() => void workload.kill('SIGKILL'));
  }
  const sources: Serve[] = [await firstServe];
  const firstAddress = sources[0].address;
  // A restart listens on the same port or path again.
  sources[0].args = serveWith(firstAddress);
  if (mode.replica) sources.push(await startServe(t, serveArgs(listen('replica.sock'))));

  // Every link goes through the proxy (unix modes: a unix proxy, so the destination still sees a unix source).
  const proxy = mode.noLink ? null : await FaultProxy.start(t, firstAddress, mode.transport === 'unix' ? join(dir, 'proxy.sock') : undefined);
  const source = proxy ? proxy.address : firstAddress;
  const sourceArgs = ['--source', source, ...(mode.replica ? ['--source', sources[1].address] : []), ...(across?.tokenArgs ?? [])];
  return {
    sourceArgs,
    env: {},
    proxy,
    firstAddress,
    restart: async () => {
      await kill(sources[0].child);
      sources[0] = await startServe(t, sources[0].args, sources[0].wrap, sources[0].host);
    },
    loseAll: async () => {
      for (const s of sources) await kill(s.child);
    },
  };
}

/** No source process: the image pushed to a snapshot store, read through a gateway of the cell's own (on the real Ceph RGW) behind the fault proxy. */
async function storeSource(t: Test, dir: string, imagePath: string): Promise<SourceUnderTest> {
  const bucket = await freshBucket(t);
  const pushed = await runCliToEnd(['store', 'push', imagePath, '--to', `${bucket}/matrix`, '--name', 'vm']);
  if (pushed.code !== 0) throw new Error(`store push failed: ${pushed.stderr}`);
  const gateway = await ownGateway(t);
  const at = new URL(gateway.endpoint);
  const proxy = await FaultProxy.start(t, `tcp:${at.hostname}:${at.port}`);
  return {
    sourceArgs: ['--image', `${bucket}/matrix/vm`, '--cache-dir', join(dir, 'cache')],
    env: { AWS_ENDPOINT_URL_S3: `http://127.0.0.1:${proxy.port}` },
    proxy,
    firstAddress: gateway.endpoint,
    restart: async () => {
      gateway.kill();
      await gateway.start();
    },
    loseAll: async () => gateway.kill(),
  };
}

/**
 * Runs one cell: `mode` moves the image at `imagePath` while `failure`
 * strikes at `cut`. Bounded by `timeoutMs` (a hang is a failed cell).
 */
export async function runCell(t: Test, mode: Mode, failure: Failure, cut: CutPoint, imagePath: string, timeoutMs = 45_000): Promise<CellResult> {
  const dir = tempDir(t, 'uffd-matrix-');
  const image = readFileSync(imagePath);
  // The image the source serves: a copy in shared memory for the modes that consume or pass it.
  let served = imagePath;
  if (mode.sharedMemoryImage) {
    const shm = mkdtempSync('/dev/shm/uffd-matrix-');
    t.teardown(() => rmSync(shm, { recursive: true, force: true }));
    served = join(shm, 'image.mem');
    copyFileSync(imagePath, served);
  }
  const listen = (name: string) => (mode.transport === 'tcp' ? 'tcp:127.0.0.1:0' : `unix:${join(dir, name)}`);
  // Live: the source is `serve --live` holding a running workload (the fixture in source mode), which pauses at once
  // (--migration postcopy: every failure strikes after the switchover) and dumps its memory as it is at the pause.
  const live = mode.live ? { socket: join(dir, 'workload.sock'), dump: join(dir, 'paused.mem') } : null;
  const serveArgs = (address: string) =>
    live
      ? ['--live', '--socket', live.socket, '--listen', address, '--migration', 'postcopy']
      : ['--image', served, '--listen', address, ...(mode.serveArgs ?? [])];
  const src = mode.store ? await storeSource(t, dir, imagePath) : await serveSource(t, mode, dir, serveArgs, listen, live, imagePath);
  const { proxy, sourceArgs } = src;
  const givingUp = failure === 'source-lost';
  const recoveryArgs = ['--silence-timeout', '1s', ...(givingUp ? ['--give-up-after', '1500ms'] : [])];
  if (mode.prepare) await mode.prepare(dir, imagePath, src.firstAddress);
  if (proxy && (failure === 'link-cut' || failure === 'link-blackholed'))
    void proxy.whenCarried('down', UNDERWAY_BYTES).then(() => {
      const open = proxy.open;
      const index = open[cut.connection % open.length];
      const at = proxy.carried(index, cut.direction) + cut.afterBytes;
      proxy.inject({ connection: index, direction: cut.direction, afterBytes: at, action: cut.action });
      void proxy.whenCarried(cut.direction, proxy.carriedInAll(cut.direction) + cut.afterBytes).then(() => (struck ||= !finished));
    });

  let finished = false;
  let struck = false;
  /** Kills strike once the chosen share of the image went down (in place: once the transfer started, it needs no link); never after the end. */
  const strike = async (ended: Promise<unknown>, started: Promise<unknown>, handler?: ChildProcess, workerPid?: () => number | undefined) => {
    if (failure === 'link-cut' || failure === 'link-blackholed') return;
    await Promise.race([proxy ? proxy.whenCarried('down', cut.afterBytes) : started, ended]);
    if (finished) return;
    struck = true;
    if (failure === 'source-restarted') await src.restart();
    else if (failure === 'source-lost') await src.loseAll();
    else if (failure === 'worker-killed') {
      const pid = workerPid?.();
      if (pid) process.kill(pid, 'SIGKILL');
    } else if (failure === 'supervisor-killed') {
      if (handler) await kill(handler);
    }
  };

  // A cell that runs past its bound is a hang: it fails, saying what the destination logged last.
  let lastWords = () => '';
  const deadline = <T>(p: Promise<T>, what: string) =>
    Promise.race([
      p,
      new Promise<never>((_, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`the cell did not end within ${timeoutMs} ms (${what}): a hang; last logged: ${lastWords()}`)),
          timeoutMs,
        );
        void p.finally(() => clearTimeout(timer));
      }),
    ]);

  if (mode.destination === 'restore') {
    const out = join(dir, 'restored.mem');
    const prefetch = mode.name === 'working-set replay' ? ['--prefetch', join(dir, 'set')] : [];
    const [cmd, ...pre] = cliCommand();
    const rate = mode.noLink ? [] : ['--rate', '16M'];
    const restore = spawn(cmd, [...pre, 'restore', ...sourceArgs, '--out', out, '--json', ...rate, ...recoveryArgs, ...prefetch, ...(mode.restoreArgs ?? [])], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...src.env },
    });
    t.teardown(() => void restore.kill('SIGKILL'));
    let stderr = '';
    let stdout = '';
    restore.stderr!.on('data', (d) => (stderr += d));
    restore.stdout!.on('data', (d) => (stdout += d));
    lastWords = () => stderr.trim().split('\n').slice(-4).join(' | ');
    const ended = once(restore, 'close').then(([code]) => code as number | null);
    void ended.then(() => (finished = true));
    const started = new Promise((resolve) =>
      restore.stderr!.on('data', () => (stderr.includes('"transfer started"') || stderr.includes('"restoring from a store"')) && resolve(true)),
    );
    const striking = strike(ended, started);
    const code = await deadline(ended, `restore, ${failure}`);
    await striking;
    if (code === 0) {
      // Live: the destination must equal the workload's memory at its pause.
      const exact = existsSync(out) && readFileSync(out).equals(live ? readFileSync(live.dump) : image);
      if (!exact) return { outcome: 'wrong', detail: 'exit 0 but the output differs from the image', struck };
      // Across a link, the source that finished paced its bulk channel (its stats are in the report).
      if (mode.link) {
        const report = JSON.parse(stdout.trim().split('\n').at(-1) || '{}') as { source?: { backgroundPacing?: { windowBytes: number } } };
        const pacing = report.source?.backgroundPacing;
        if (!pacing) return { outcome: 'wrong', detail: 'byte-exact, but the source did not pace its bulk channel across the link', struck };
        return { outcome: 'exact', detail: `byte-exact, paced (a window of ${pacing.windowBytes} bytes at the end)`, struck };
      }
      return { outcome: 'exact', detail: 'byte-exact', struck };
    }
    // The code the restore ended with: its last error line's.
    const codes = [...stderr.matchAll(/"level":50[^\n]*?"code":"(ERR_[A-Z_]+)"/g)];
    const codeName = codes.at(-1)?.[1] ?? 'no code';
    if (givingUp && codeName === 'ERR_SOURCE_LOST' && !existsSync(out))
      return { outcome: 'gave-up', detail: `exit ${code}, ${codeName}, nothing written`, struck };
    return {
      outcome: 'wrong',
      detail: `exit ${code}, ${codeName}${existsSync(out) ? ', output written' : ''}: ${stderr.trim().split('\n').slice(-3).join(' | ')}`,
      struck,
    };
  }

  // A VMM through the handler.
  const handlerSocket = join(dir, 'handler.sock');
  const [cmd, ...pre] = cliCommand();
  const handle = spawn(cmd, [...pre, 'handle', '--socket', handlerSocket, ...sourceArgs, '--rate', '16M', ...recoveryArgs, ...(mode.handleArgs ?? [])], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...src.env },
  });
  t.teardown(() => void handle.kill('SIGKILL'));
  const handleLogs = logsOf(handle);
  lastWords = () =>
    handleLogs.lines
      .slice(-8)
      .map((l) => `${l.msg}${l.code ? ` (${l.code})` : ''}${l.state ? ` [${l.from ?? ''}->${l.state}]` : ''}`)
      .join(' | ');
  let workerPid: number | undefined;
  void handleLogs
    .wait('a worker', (l) => l.msg === 'worker started')
    .then(
      (l) => (workerPid = l.workerPid as number),
      () => {},
    );
  await deadline(
    new Promise<void>((resolve, reject) => {
      let out = '';
      handle.stdout!.on('data', (d) => {
        out += d;
        if (out.includes('\n')) resolve();
      });
      handle.once('exit', (code) => reject(new Error(`handle exited with ${code} before listening: ${handleLogs.lines.map((l) => l.msg).join(' | ')}`)));
    }),
    'handle to listen',
  );
  if (failure === 'worker-killed') await handleLogs.wait('a worker', (l) => l.msg === 'worker started');
  const vmm = spawn(buildFixture('vmm'), ['--socket', handlerSocket, '--image', imagePath, '--threads', '2', '--order', 'random', ...(mode.vmmArgs ?? [])], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  t.teardown(() => void vmm.kill('SIGKILL'));
  let vmmOut = '';
  let vmmErr = '';
  vmm.stdout!.on('data', (d) => (vmmOut += d));
  vmm.stderr!.on('data', (d) => (vmmErr += d));
  const ended = once(vmm, 'close').then(([code, signal]) => ({ code: code as number | null, signal: signal as string | null }));
  void ended.then(() => (finished = true));
  const striking = strike(
    ended,
    handleLogs.wait('the transfer', (l) => l.msg === 'transfer started', timeoutMs).catch(() => {}),
    handle,
    () => workerPid,
  );
  const { code, signal } = await deadline(ended, `VMM, ${failure}`);
  await striking;
  if (code === 0) {
    const report = JSON.parse(vmmOut.trim().split('\n')[0] || '{}') as { ok?: boolean; mismatchedPages?: number };
    return report.ok && report.mismatchedPages === 0
      ? { outcome: 'exact', detail: 'the VMM verified every byte', struck }
      : { outcome: 'wrong', detail: `VMM report ${vmmOut.trim()}`, struck };
  }
  if (givingUp && signal === 'SIGBUS') return { outcome: 'gave-up', detail: 'the VMM got SIGBUS on a poisoned page', struck };
  return { outcome: 'wrong', detail: `VMM exit ${code} ${signal ?? ''}: ${vmmErr.trim()} ${vmmOut.trim()}`, struck };
}

/** The cells to run: MATRIX_MODES and MATRIX_FAILURES (comma-separated) pick a part; MATRIX_CUT fixes the point. */
function picked(env: string | undefined): Set<string> | null {
  return env ? new Set(env.split(',')) : null;
}

/**
 * Runs every cell whose destination is `destination` `rounds` times at seeded
 * random points; each cell is a subtest. Returns the table of outcomes, a row
 * per cell (and a row per cell that does not apply, saying why).
 */
export async function runMatrix(t: Test, destination: Mode['destination'], seed: number, rounds = 1): Promise<string[]> {
  const random = seededRandom(seed);
  const modes = picked(process.env.MATRIX_MODES);
  const failures = picked(process.env.MATRIX_FAILURES);
  const imagePath = writeImage(tempDir(t), randomImage(MATRIX_PAGES, 7));
  const table: string[] = [];
  for (const mode of MODES) {
    if (mode.destination !== destination || (modes && !modes.has(mode.name))) continue;
    if (mode.link && process.getuid?.() !== 0) {
      table.push(`${mode.name} | * | skipped: network namespaces need root`);
      continue;
    }
    if (mode.hugePages && !reserveHugePages(t, mode.hugePages)) {
      table.push(`${mode.name} | * | skipped: this machine cannot reserve ${mode.hugePages} huge pages`);
      continue;
    }
    for (const failure of FAILURES) {
      if (failures && !failures.has(failure)) continue;
      const not = mode.notCells?.[failure];
      if (not) {
        table.push(`${mode.name} | ${failure} | ${not.open ? 'held out, an open defect' : 'does not apply'}: ${not.why}`);
        continue;
      }
      for (let round = 0; round < rounds; round++) {
        const drawn = cutPoint(failure, random);
        // MATRIX_CUT='{"direction":"down","afterBytes":8,"action":"rst","connection":0}' replays one point.
        const cut: CutPoint = process.env.MATRIX_CUT ? { ...drawn, ...(JSON.parse(process.env.MATRIX_CUT) as Partial<CutPoint>) } : drawn;
        const where = failure.startsWith('link')
          ? `${cut.action} ${cut.direction} on connection ${cut.connection} (of those open), ${cut.afterBytes} bytes on`
          : `after ${cut.afterBytes} bytes down`;
        await t.test(`${mode.name} | ${failure} | ${where}`, async (t) => {
          const r = await runCell(t, mode, failure, cut, imagePath);
          table.push(`${mode.name} | ${failure} | ${r.outcome}${r.struck ? '' : ' (the failure came after the end)'}: ${r.detail}`);
          if (failure === 'source-lost') t.ok(r.outcome === 'exact' || r.outcome === 'gave-up', `${r.outcome}: ${r.detail}`);
          else t.equal(r.outcome, 'exact', r.detail);
        });
      }
    }
  }
  return table;
}
