// Shared test plumbing: temp dirs, images with known content, the C fixture,
// and a tiny fault-serving loop for tests that resolve faults from JS.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createHash, randomBytes } from 'node:crypto';
import { createServer, type Socket } from 'node:net';
import { FrameReader, encodeFrame, keepAlive, type Message } from '../lib/protocol.js';
import type { Test } from 'tap';
import { Userfaultfd as UserfaultfdClass, type Userfaultfd } from '../lib/uffd.js';
import { mapAnonymous } from '../lib/memory.js';
import { socketPair } from '../lib/fd-passing.js';
import { FaultEngine, type ChannelFailure } from '../client/fault-engine.js';
import { LINKS, bringUp, type LinkUp } from '../bench/links.js';
import type { RecoveryOptions } from '../client/session.js';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { VmmHandler } from '../client/vmm-handler.js';

export const here = dirname(fileURLToPath(import.meta.url));

// The default token file a TCP `serve` creates and `restore` finds: one per
// test process, in the temp dir, never the user's own.
process.env.POSTCOPY_TOKEN_FILE ??= join(tmpdir(), `uffd-postcopy-token-${process.pid}`);
process.once('exit', () => rmSync(process.env.POSTCOPY_TOKEN_FILE!, { force: true }));
// A store restore that names no cache uses this test file's own (never the host's, which outlives the run).
process.env.POSTCOPY_CHUNK_CACHE ??= join(tmpdir(), `uffd-postcopy-chunks-${process.pid}`);
process.once('exit', () => rmSync(process.env.POSTCOPY_CHUNK_CACHE!, { recursive: true, force: true, maxRetries: 3 }));
export const PAGE = 4096;

/**
 * Waits for an event the test can only observe by looking: calls `probe` until it
 * returns something other than undefined or false, and fails after `timeoutMs`
 * naming `what` it waited for. Every polling wait in the tests goes through here.
 */
export async function until<T>(
  what: string,
  probe: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs = 60_000,
  everyMs = 10,
): Promise<T> {
  for (const end = Date.now() + timeoutMs; ;) {
    const v = await probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() >= end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export function tempDir(t: Test, prefix = 'uffd-postcopy-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  // A child killed in another teardown may still be writing here (serve keeps its sums beside an image): retried while the directory fills.
  t.teardown(() => rmSync(dir, { recursive: true, force: true, maxRetries: 20, retryDelay: 50 }));
  return dir;
}

/** An image of `pages` pages of random bytes, every `zeroEvery`-th page all zero. */
export function randomImage(pages: number, zeroEvery = 0): Buffer {
  const image = randomBytes(pages * PAGE);
  if (zeroEvery > 0) for (let p = 0; p < pages; p += zeroEvery) image.fill(0, p * PAGE, (p + 1) * PAGE);
  return image;
}

export function writeImage(dir: string, image: Buffer, name = 'image.bin'): string {
  const path = join(dir, name);
  writeFileSync(path, image);
  return path;
}

export { buildFixture } from '../lib/c-programs.js';

/**
 * A handler (on a socket in a temp dir) serving an image file of `bytes`:
 * from the file itself (`image`), or from a source process of our own on a
 * unix socket (`source`). All closed at the test's teardown.
 */
export async function handlerOverImage(t: Test, bytes: Buffer, from: 'image' | 'source', background: boolean) {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, bytes);
  const image = Image.open([{ path: imagePath }]);
  let server: PageServer | null = null;
  let handler: VmmHandler;
  if (from === 'image') {
    handler = new VmmHandler({ image, background: { enabled: background } });
  } else {
    server = new PageServer({ image });
    const where = await server.listen(`unix:${join(dir, 'source.sock')}`);
    handler = new VmmHandler({ source: `unix:${(where as { path: string }).path}`, background: { enabled: background } });
  }
  const socket = join(dir, 'handler.sock');
  await handler.listen(socket);
  t.teardown(async () => {
    await handler.close();
    await server?.close();
    image.close();
  });
  return { handler, socket, imagePath };
}

/** A welcome a fake source sends: a one-region image, plaintext channels; override what a test needs. */
export function fakeWelcome(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    t: 'welcome',
    session: 'f'.repeat(32),
    resumed: false,
    fingerprint: '0'.repeat(64),
    encryption: 'none',
    regions: [{ id: 0, name: 'r', length: 16 * PAGE, pageSize: PAGE }],
    tickets: { urgent: Buffer.alloc(32), bulk: Buffer.alloc(32) },
    limits: { maxFrame: 4 << 20, maxRunBytes: 2 << 20 },
    capabilities: [],
    ...overrides,
  };
}

/**
 * A source that speaks only the handshake: challenge (no token), then the
 * welcome `welcome()` returns for that connection, then nothing. Returns its
 * address (unix socket in a temp dir, or TCP on loopback).
 */
export async function fakeSource(t: Test, welcome: () => Record<string, unknown>, transport: 'unix' | 'tcp' = 'unix'): Promise<string> {
  const server = createServer((socket) => {
    socket.on('error', () => {});
    const reader = new FrameReader(socket);
    const reply = welcome();
    void (async () => {
      await reader.next(['hello'], 5000);
      socket.write(encodeFrame({ t: 'challenge', protocol: 1, software: 'fake', nonce: Buffer.alloc(32, 7), auth: 'none' }));
      await reader.next(['auth'], 5000);
      socket.write(encodeFrame(reply as Message));
    })().catch(() => socket.destroy());
  });
  t.teardown(() => server.close());
  if (transport === 'tcp') {
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return `tcp:127.0.0.1:${(server.address() as { port: number }).port}`;
  }
  const path = join(tempDir(t), 'fake-source.sock');
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return `unix:${path}`;
}

/** How a fake serving source answers `done`. */
export type DoneAnswer =
  | 'digest' // the right digest, then bye as usual
  | 'mismatch' // a well-formed digest of other bytes
  | 'malformed' // a digest without its regions
  | 'error' // an error message, then the connection closes
  | 'silent' // no answer, and no heartbeat any more (the connection stays open)
  | 'frozen'; // the right digest, then nothing at all: no heartbeat, no reply to bye, no close (a source stopped with SIGSTOP)

/**
 * A source of our own making that serves `image` (one region, plaintext data
 * channels) as a real one does: every page on the bulk channel at `start`,
 * then END; and answers `done` as `answer` says. Counts its control
 * connections; the first `busyFirst` it turns away with ERR_SOURCE_BUSY. On a unix socket in a temp dir; closed at teardown.
 */
export async function fakeServingSource(
  t: Test,
  image: Buffer,
  answer: DoneAnswer,
  options: { busyFirst?: number } = {},
): Promise<{ address: string; connections: () => number }> {
  const sha256 = createHash('sha256').update(image).digest('hex');
  const bulk = new Map<string, Socket>(); // session id -> its bulk channel
  const sockets = new Set<Socket>();
  let connections = 0;
  let sessions = 0;
  const runHeader = (kind: number, first: number, count: number) => {
    const h = Buffer.alloc(24);
    h.writeUInt32LE(kind, 0);
    h.writeBigUInt64LE(BigInt(first), 8);
    h.writeUInt32LE(count, 16);
    h.writeUInt32LE(2, 20); // background
    return h;
  };
  // Frozen peers never answer a FIN: the half-open side stays open.
  const server = createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const reader = new FrameReader(socket);
    void (async () => {
      const first = await reader.next(['hello', 'attach'], 5000);
      if (first.t === 'attach') {
        if (first.channel === 'bulk') bulk.set(first.session as string, socket);
        reader.detach(); // page requests (urgent) are not read: every page goes on the bulk channel
        socket.write(encodeFrame({ t: 'attached' }));
        return;
      }
      connections++;
      if (connections <= (options.busyFirst ?? 0)) {
        // As a real source closes the oldest connection still to authenticate to make room.
        socket.write(encodeFrame({ t: 'error', code: 'ERR_SOURCE_BUSY', message: 'the source is busy (fake)' }));
        socket.destroy();
        return;
      }
      socket.write(encodeFrame({ t: 'challenge', protocol: 1, software: 'fake', nonce: Buffer.alloc(32, 7), auth: 'none' }));
      await reader.next(['auth'], 5000);
      const session = (++sessions).toString(16).padStart(32, '0');
      socket.write(encodeFrame(fakeWelcome({ session, regions: [{ id: 0, name: 'r', length: image.length, pageSize: PAGE }] }) as Message));
      const stopBeating = keepAlive(socket, reader, { intervalMs: 100, silenceMs: 10_000 });
      await reader.next(['options'], 5000);
      while ((await reader.next(['have', 'prefetch', 'start'], 5000)).t !== 'start');
      socket.write(encodeFrame({ t: 'started' }));
      const pages = await until('the bulk channel', () => bulk.get(session), 5000);
      pages.write(Buffer.concat([runHeader(0x41544144, 0, image.length / PAGE), image, runHeader(0x20444e45, 0, 0)]));
      await reader.next(['done'], 0);
      const digest = { t: 'digest', regions: [{ id: 0, sha256 }], stats: {} };
      if (answer === 'digest') socket.write(encodeFrame(digest as Message));
      else if (answer === 'mismatch') socket.write(encodeFrame({ ...digest, regions: [{ id: 0, sha256: '0'.repeat(64) }] } as Message));
      else if (answer === 'malformed') socket.write(encodeFrame({ t: 'digest', stats: {} } as unknown as Message));
      else if (answer === 'error') socket.end(encodeFrame({ t: 'error', code: 'ERR_INTERNAL', message: 'the fake source fails at done' }));
      if (answer === 'silent' || answer === 'frozen') {
        if (answer === 'frozen') socket.write(encodeFrame(digest as Message));
        stopBeating();
        reader.detach(); // reads nothing more, answers nothing, closes nothing
        pages.pause();
        return;
      }
      await reader.next(['bye'], 0);
      socket.end();
    })().catch(() => socket.destroy());
  });
  t.teardown(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  const path = join(tempDir(t), 'fake-source.sock');
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { address: `unix:${path}`, connections: () => connections };
}

/** Detection for tests: heartbeats every 50 ms, silent after 400 ms, quick retries. */
export const FAST_HEARTBEAT = { intervalMs: 50, silenceMs: 400 };
export const FAST_RECOVERY: RecoveryOptions = {
  heartbeat: FAST_HEARTBEAT,
  stallTimeoutMs: 400,
  retryDelayMs: { initial: 20, max: 200 },
  connectTimeoutMs: 2000,
};

/**
 * Serves missing faults of [base, base+image.length) from `image` until `done`
 * settles; returns how many faults it resolved.
 */
export async function serveFaultsFromJs(uffd: Userfaultfd, base: number, image: Buffer, done: Promise<unknown>): Promise<number> {
  let finished = false;
  void done.finally(() => (finished = true)).catch(() => {});
  let faults = 0;
  while (!finished) {
    if (!(await uffd.waitReadable(20))) continue;
    for (const ev of uffd.readEvents()) {
      if (ev.type !== 'pagefault') continue;
      const page = Math.floor((ev.address - base) / PAGE);
      const r = uffd.copy(base + page * PAGE, image, { sourceOffset: page * PAGE, length: PAGE });
      if (r.code !== null && r.code !== 'EEXIST') throw new Error(`copy stopped with ${r.code}`);
      faults++;
    }
  }
  return faults;
}

let compiledCli: string | null | undefined;

/**
 * The compiled CLI (dist/, built by `npm install`) when it is newer than every
 * source file, else null. It starts in well under a second; the sources
 * through the test's TypeScript loader take several.
 */
function freshCompiledCli(): string | null {
  if (compiledCli !== undefined) return compiledCli;
  const root = join(here, '..');
  const built = join(root, 'dist', 'bin', 'postcopy.js');
  const builtAt = statSync(built, { throwIfNoEntry: false })?.mtimeMs ?? 0;
  const newest = (dir: string): number =>
    readdirSync(dir, { withFileTypes: true }).reduce((m, e) => {
      if (e.isDirectory()) return Math.max(m, newest(join(dir, e.name)));
      return e.name.endsWith('.ts') ? Math.max(m, statSync(join(dir, e.name)).mtimeMs) : m;
    }, 0);
  const sourcesAt = Math.max(...['bin', 'lib', 'client', 'server', 'bench'].map((d) => newest(join(root, d))));
  compiledCli = builtAt > sourcesAt ? built : null;
  return compiledCli;
}

/** Builds dist/ (as `npm install` does) unless it is fresh already. */
export function ensureBuilt(): void {
  if (freshCompiledCli()) return;
  execFileSync('npm', ['run', 'build'], { cwd: join(here, '..'), stdio: 'ignore' });
  compiledCli = undefined;
}

/** argv that runs the CLI: compiled when fresh, else from sources with the same TypeScript loader as this test. */
export function cliCommand(): string[] {
  const built = freshCompiledCli();
  return built ? [process.execPath, built] : [process.execPath, ...process.execArgv, join(here, '..', 'bin', 'postcopy.ts')];
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

export interface CliChild {
  child: ChildProcess;
  /** Everything it wrote so far. */
  output(): { stdout: string; stderr: string };
  /** Its end: exit code or signal, and everything it wrote. */
  exited: Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }>;
}

/** Starts `postcopy ...args` as a child, its output collected; killed (-9) at the test's teardown. */
export function spawnCli(t: Test, args: string[], env: Record<string, string> = {}): CliChild {
  const [cmd, ...pre] = cliCommand();
  const child = spawn(cmd, [...pre, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  t.teardown(() => {
    child.kill('SIGKILL');
  });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d) => (stdout += d));
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }>((resolve) =>
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })),
  );
  return { child, output: () => ({ stdout, stderr }), exited };
}

/** Runs `postcopy ...args` to completion (in `cwd`, when given). */
export function runCli(args: string[], env: Record<string, string> = {}, cwd?: string, wrap: string[] = []): Promise<CliResult> {
  const [cmd, ...pre] = [...wrap, ...cliCommand()];
  const child = spawn(cmd, [...pre, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env }, ...(cwd ? { cwd } : {}) });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
}

/** Starts `postcopy serve` and resolves once it listens; killed at teardown. */
export async function startServeCli(
  t: Test,
  args: string[],
): Promise<{
  child: ChildProcess;
  listening: { kind: string; path?: string; port?: number };
  tokenFile?: string;
  metrics?: string;
  /** What it logged (stderr) so far. */
  log: () => string;
}> {
  const [cmd, ...pre] = cliCommand();
  const child = spawn(cmd, [...pre, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => {
    child.kill('SIGTERM');
  });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  // The address line, then (with --metrics) the metrics URL line.
  const want = args.includes('--metrics') ? 2 : 1;
  const lines = await new Promise<string[]>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d) => {
      out += d;
      const got = out.split('\n').slice(0, -1);
      if (got.length >= want) resolve(got);
    });
    child.once('exit', (code) => reject(new Error(`serve exited with ${code}: ${stderr}`)));
  });
  const { listening, tokenFile } = JSON.parse(lines[0]);
  return { child, listening, tokenFile, ...(want > 1 ? { metrics: JSON.parse(lines[1]).metrics as string } : {}), log: () => stderr };
}

/** Reserves `n` more huge pages (vm.nr_hugepages) for the test's life; false when the machine cannot. */
export function reserveHugePages(t: Test, n: number): boolean {
  const nr = '/proc/sys/vm/nr_hugepages';
  const before = Number(readFileSync(nr, 'utf8'));
  try {
    writeFileSync(nr, String(before + n));
  } catch {
    return false;
  }
  t.teardown(() => writeFileSync(nr, String(before)));
  const free = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
  return free >= n;
}

/**
 * A source serving `imagePath` across a veth pair into a network namespace,
 * shaped to 1 Gbit/s (bench/links.ts), taken down with the test; null (said as
 * a comment) where namespaces cannot be made.
 */
export async function gigabitLink(t: Test, imagePath: string, dir: string): Promise<LinkUp | null> {
  const link = await bringUp(
    LINKS.find((l) => l.name === 'veth-1g')!,
    imagePath,
    dir,
  );
  if ('skipped' in link) {
    t.comment(`skipped: ${link.skipped}`);
    return null;
  }
  t.teardown(() => link.up.down());
  return link.up;
}

/**
 * A fault engine over `pages` pages between two sentinel pages filled with
 * 0xee, its data channels attached to socket pairs whose other ends are
 * returned (`bulk`, `urgent`); `failed` settles with its first channel failure.
 * `finish()` stops it and reads the region back (the region's pages, and
 * whether both sentinels are untouched).
 */
export function sentinelEngine(pages: number) {
  const whole = mapAnonymous((pages + 2) * PAGE);
  whole.buffer(0, PAGE).fill(0xee);
  whole.buffer((pages + 1) * PAGE, PAGE).fill(0xee);
  const uffd = UserfaultfdClass.open();
  uffd.handshake();
  uffd.register(whole.address + PAGE, pages * PAGE);
  const engine = new FaultEngine({ uffd: uffd.fd, regions: [{ base: whole.address + PAGE, length: pages * PAGE, pageSize: PAGE }] });
  const failed = new Promise<ChannelFailure>((resolve) => engine.once('channel-failed', resolve));
  engine.start();
  const [bulk, bulkTheirs] = socketPair();
  const [urgent, urgentTheirs] = socketPair();
  engine.attachChannels({ urgentFd: urgentTheirs, bulkFd: bulkTheirs });
  return {
    engine,
    failed,
    bulk,
    urgent,
    finish(): { pages: Buffer; sentinels: boolean } {
      engine.stop();
      uffd.unregister(whole.address + PAGE, pages * PAGE);
      const out = Buffer.from(whole.buffer(PAGE, pages * PAGE));
      const sentinels = whole.buffer(0, PAGE).every((b) => b === 0xee) && whole.buffer((pages + 1) * PAGE, PAGE).every((b) => b === 0xee);
      uffd.close();
      whole.unmap();
      return { pages: out, sentinels };
    },
  };
}
