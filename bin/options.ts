// What the subcommands share: token files, sizes, progress lines, and how to
// start this same CLI as a child process.
import { existsSync, statSync } from 'node:fs';
import { defaultTokenPath, ensureToken, readToken } from '../lib/token.js';
import { fileURLToPath } from 'node:url';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import type { DestinationStats } from '../lib/native.js';
import type { RecoveryOptions } from '../client/session.js';

/** Reads a token file (whitespace trimmed); warns when others can read it. */
export function readTokenFile(path: string | undefined, log: Logger): string | undefined {
  if (!path) return undefined;
  const token = readToken(path, '--token-file');
  if (statSync(path).mode & 0o077) log.warn({ path }, 'the token file is readable by other users; chmod 600 it');
  return token;
}

/**
 * The token a destination proves: --token-file's; else, for a TCP source,
 * the default token file when there is one (the one `serve` made on this host).
 */
export function destinationToken(tokenFile: string | undefined, source: string, log: Logger): string | undefined {
  if (tokenFile) return readTokenFile(tokenFile, log);
  if (!source.startsWith('tcp:') || !existsSync(defaultTokenPath())) return undefined;
  log.info({ tokenFile: defaultTokenPath() }, 'using the default token file');
  return readToken(defaultTokenPath(), 'the default token file');
}

/**
 * The token a source requires: --token-file's; else, on TCP (loopback too:
 * other users of this host must not read the image), the default token file,
 * created mode 0600 when there is none.
 */
export function sourceToken(tokenFile: string | undefined, listen: string, log: Logger): { token?: string; tokenFile?: string } {
  if (tokenFile) return { token: readTokenFile(tokenFile, log), tokenFile };
  if (!listen.startsWith('tcp:')) return {};
  const path = defaultTokenPath();
  const { token, created } = ensureToken(path);
  log.warn({ tokenFile: path, created }, 'TCP needs a token: destinations on this host find it in this file; give it (--token-file) to those elsewhere');
  return { token, tokenFile: path };
}

/** "64M", "2G", "4096", "512K" -> bytes. */
export function parseSize(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  if (!m) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `${what}: not a size: ${text}`);
  const scale = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  return Math.round(Number(m[1]) * scale);
}

export function parseCount(text: string | undefined, what: string, fallback: number, max = Number.MAX_SAFE_INTEGER): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 0 || n > max) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `${what} must be an integer from 0 to ${max}, not ${text}`);
  return n;
}

/** "500ms", "5s", "2m", "1h" (a bare number is seconds) -> milliseconds. */
export function parseDuration(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text.trim());
  if (!m) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `${what}: not a duration: ${text} (e.g. 500ms, 30s, 5m)`);
  const ms = Math.round(Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h']);
  if (ms <= 0) throw new PostcopyError(ErrorCode.OUT_OF_RANGE, `${what} must be longer than 0, not ${text}`);
  return ms;
}

/** The options every destination (restore, handle) takes to detect failures and recover. */
export const recoveryOptionSpec = {
  'give-up-after': { type: 'string' },
  'silence-timeout': { type: 'string' },
} as const;

export const recoveryUsage = `  --give-up-after DURATION   when the source is out of reach this long, fail
                             (default: keep reconnecting, warning at each attempt)
  --silence-timeout DURATION a control channel or page stream quiet this long
                             is taken as broken (default 5s)`;

/** --give-up-after and --silence-timeout -> the session's recovery options. */
export function parseRecovery(values: { 'give-up-after'?: string; 'silence-timeout'?: string }): RecoveryOptions {
  const silence = values['silence-timeout'] === undefined ? undefined : parseDuration(values['silence-timeout'], '--silence-timeout');
  return {
    ...(values['give-up-after'] !== undefined ? { giveUpAfterMs: parseDuration(values['give-up-after'], '--give-up-after') } : {}),
    ...(silence !== undefined ? { heartbeat: { intervalMs: Math.max(10, Math.min(1000, silence / 5)), silenceMs: silence }, stallTimeoutMs: silence } : {}),
  };
}

/** "--window F:B" -> pages after and before each request. */
export function parseWindow(text: string | undefined, usage: string): { forward: number; backward: number } | undefined {
  if (text === undefined) return undefined;
  const m = /^(\d+):(\d+)$/.exec(text);
  if (!m) throw new UsageError(`--window takes F:B, e.g. 8:2\n\n${usage}`);
  return { forward: parseCount(m[1], 'window forward', 0, 1024), backward: parseCount(m[2], 'window backward', 0, 1024) };
}

/** A mistake in the command line: print the usage, exit 2. */
export class UsageError extends Error {}

/** A one-line progress display on a terminal (stderr); nothing when not a terminal. */
export function startProgress(stats: () => DestinationStats, state: () => string = () => 'running'): () => void {
  if (!process.stderr.isTTY) return () => {};
  const draw = () => {
    const s = stats();
    const now = state();
    if (now === 'paused' || now === 'resuming') {
      process.stderr.write(`\r\x1b[2K${now.toUpperCase()}: the source is out of reach; ${s.outstandingRequests} requested page(s) wait (reconnecting)`);
      return;
    }
    const pct = s.totalPages ? ((100 * s.residentPages) / s.totalPages).toFixed(1) : '0';
    const p50 = (s.faultLatency.p50Ns / 1000).toFixed(1);
    process.stderr.write(`\r\x1b[2Kresident ${pct}% (${s.residentPages}/${s.totalPages} pages)  faults ${s.faults}  p50 ${p50} µs  ${(s.bytesReceived / 2 ** 20).toFixed(1)} MiB in`);
  };
  const timer = setInterval(draw, 200);
  return () => {
    clearInterval(timer);
    draw();
    process.stderr.write('\n');
  };
}

/** argv that runs this CLI again (same Node, same loader flags when run from sources). */
export function selfCommand(): string[] {
  const entry = fileURLToPath(new URL(`./postcopy${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url));
  return [process.execPath, ...process.execArgv, entry];
}
