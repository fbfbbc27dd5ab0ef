// Benchmark plumbing: the floor's image on disk, a source page server in its
// own process (optionally inside a network namespace), and per-thread CPU
// accounting from /proc.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, openSync, closeSync, writeSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { once } from 'node:events';
import { PAGE_SIZE } from '../lib/memory.js';
import { selfCommand } from '../lib/package-root.js';
import { readToken } from '../lib/token.js';
import { stopAtExit } from './cleanup.js';

/** Writes the floor's image (page i filled with byte (i*7+1)) unless it is there already. */
export function floorImageFile(dir: string, pages: number): string {
  const path = join(dir, `floor-image-${pages}.bin`);
  if (existsSync(path)) return path;
  const fd = openSync(path, 'w', 0o600);
  try {
    const chunkPages = 4096;
    const chunk = Buffer.allocUnsafe(chunkPages * PAGE_SIZE);
    for (let first = 0; first < pages; first += chunkPages) {
      const n = Math.min(chunkPages, pages - first);
      for (let p = 0; p < n; p++) chunk.fill(((first + p) * 7 + 1) & 0xff, p * PAGE_SIZE, (p + 1) * PAGE_SIZE);
      writeSync(fd, chunk, 0, n * PAGE_SIZE, first * PAGE_SIZE);
    }
  } finally {
    closeSync(fd);
  }
  return path;
}

export interface RunningSource {
  address: string;
  /** The token a destination must prove (a TCP source always has one). */
  token?: string;
  pid: number;
  close(): Promise<void>;
}

/**
 * Starts `postcopy serve` for one image. `wrap` prefixes the command (e.g.
 * `ip netns exec NS`, `taskset -c 1`); `extra`: more serve options.
 */
export async function startSource(
  imagePath: string,
  listen: string,
  options: { wrap?: string[]; tokenFile?: string; connectHost?: string; extra?: string[] } = {},
): Promise<RunningSource> {
  const [cmd, ...args] = [...(options.wrap ?? []), ...selfCommand()];
  // TCP needs a token: a bench source gets its own beside the image, never the user's default one.
  let tokenFile = options.tokenFile;
  if (!tokenFile && listen.startsWith('tcp:')) {
    tokenFile = join(dirname(imagePath), `token-${randomBytes(6).toString('hex')}`);
    writeFileSync(tokenFile, randomBytes(24).toString('base64url'), { mode: 0o600 });
  }
  const child: ChildProcess = stopAtExit(
    spawn(cmd, [...args, 'serve', '--image', imagePath, '--listen', listen, ...(tokenFile ? ['--token-file', tokenFile] : []), ...(options.extra ?? [])], {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, POSTCOPY_LOG_LEVEL: process.env.POSTCOPY_LOG_LEVEL || 'warn' },
    }),
  );
  const line = await new Promise<string>((resolve, reject) => {
    const rl = createInterface({ input: child.stdout! });
    rl.once('line', (l) => {
      rl.close();
      resolve(l);
    });
    child.once('exit', (code) => reject(new Error(`the source exited with ${code} before listening`)));
  });
  const { listening: where, tokenFile: usedTokenFile } = JSON.parse(line) as {
    listening: { kind: string; path?: string; host?: string; port?: number };
    tokenFile?: string;
  };
  const address = where.kind === 'unix' ? `unix:${where.path}` : `tcp:${options.connectHost ?? where.host}:${where.port}`;
  return {
    address,
    ...(usedTokenFile ? { token: readToken(usedTokenFile) } : {}),
    pid: child.pid!,
    async close() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill('SIGTERM');
      await exited;
    },
  };
}

export interface ThreadSample {
  name: string;
  cpuNs: number;
  lastCpu: number;
}

/** CPU time (ns, from schedstat) and last CPU of each live thread of `pid`. */
export function threadSamples(pid: number | 'self'): Map<number, ThreadSample> {
  const out = new Map<number, ThreadSample>();
  const base = `/proc/${pid}/task`;
  let tids: string[];
  try {
    tids = readdirSync(base);
  } catch {
    return out;
  }
  for (const tid of tids) {
    try {
      const name = readFileSync(`${base}/${tid}/comm`, 'utf8').trim();
      const cpuNs = Number(readFileSync(`${base}/${tid}/schedstat`, 'utf8').split(' ')[0]);
      const stat = readFileSync(`${base}/${tid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      out.set(Number(tid), { name, cpuNs, lastCpu: Number(fields[36]) });
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}

/** CPU ns the whole process `pid` has spent, its ended threads included (/proc stat, in clock ticks of 10 ms). */
export function processCpuNs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * 1e7; // utime + stime, at 100 ticks a second
}

/** CPU ns spent since `before` by threads whose name passes `keep` (new threads count from zero). */
export function cpuSince(before: Map<number, ThreadSample>, after: Map<number, ThreadSample>, keep: (name: string) => boolean = () => true): number {
  let ns = 0;
  for (const [tid, s] of after) if (keep(s.name)) ns += s.cpuNs - (before.get(tid)?.cpuNs ?? 0);
  return ns;
}

/**
 * Runs `postcopy ARGS...` (warnings and errors only in its logs) and resolves
 * with its last stdout line as JSON; a non-zero exit rejects with what it
 * said on stderr.
 */
export function runCliJson<T = Record<string, unknown>>(args: string[]): Promise<T> {
  const [cmd, ...pre] = selfCommand();
  return new Promise((resolve, reject) => {
    const child = stopAtExit(spawn(cmd, [...pre, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, POSTCOPY_LOG_LEVEL: 'warn' } }));
    let out = '';
    let err = '';
    child.stdout!.on('data', (d) => (out += d));
    child.stderr!.on('data', (d) => (err += d));
    child.on('close', (code) => {
      if (code !== 0) return reject(new Error(`postcopy ${args.slice(0, 2).join(' ')} exited with ${code}: ${err.trim()}`));
      try {
        resolve(JSON.parse(out.trim().split('\n').pop()!) as T);
      } catch {
        reject(new Error(`postcopy ${args.slice(0, 2).join(' ')} printed no JSON line`));
      }
    });
  });
}
