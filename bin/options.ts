// What the subcommands share: token files, sizes, progress lines, and how to
// start this same CLI as a child process.
import { TenantKey } from '../lib/store/tenant.js';
import { accessSync, constants, existsSync, statSync } from 'node:fs';
import { dirname } from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { defaultTokenPath, ensureToken, readToken } from '../lib/token.js';
import { formatAddress, parseAddress, type Address } from '../lib/address.js';
import { createServer, type AddressInfo } from 'node:net';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import type { RecoveryOptions } from '../client/session.js';
import { metricsUrl } from '../lib/metrics.js';

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
  const file = destinationTokenFile(undefined, source);
  if (!file) return undefined;
  log.info({ tokenFile: file }, 'using the default token file');
  return readToken(file, 'the default token file');
}

/** The file a destination reads its token from (--token-file, or the default one on TCP when it exists), or undefined. */
function destinationTokenFile(tokenFile: string | undefined, source: string): string | undefined {
  if (tokenFile) return tokenFile;
  return source.startsWith('tcp:') && existsSync(defaultTokenPath()) ? defaultTokenPath() : undefined;
}

/** A refused token, said with the file this destination read it from (or that it holds none). */
export function withTokenFile(err: unknown, tokenFile: string | undefined, source: string): unknown {
  const e = err as PostcopyError;
  if (e?.code !== ErrorCode.AUTH_FAILED && e?.code !== ErrorCode.AUTH_REQUIRED) return err;
  const file = destinationTokenFile(tokenFile, source);
  e.message += file ? ` (this destination's token is from ${file}; give both sides the same file)` : ' (this destination holds no token: --token-file)';
  return e;
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
  // Said loudly once, when the file is made; on later starts it is only the file in use.
  log[created ? 'warn' : 'info'](
    { tokenFile: path, created },
    created
      ? 'TCP needs a token: one was created; destinations on this host find it in this file; give it (--token-file) to those elsewhere'
      : 'using the default token file',
  );
  return { token, tokenFile: path };
}

/** A mistake on the command line, said in one line naming the option and the value: exit 2. */
export class UsageError extends PostcopyError {
  constructor(message: string) {
    super(ErrorCode.USAGE, message);
  }
}

type OptionSpec = NonNullable<ParseArgsConfig['options']>;
/** What parseCommandLine returns for a spec: strings, booleans, and lists of them for `multiple`. */
export type OptionValues<T extends OptionSpec> = {
  [K in keyof T]?: T[K] extends { multiple: true }
    ? T[K] extends { type: 'boolean' }
      ? boolean[]
      : string[]
    : T[K] extends { type: 'boolean' }
      ? boolean
      : string;
};

/**
 * A subcommand's options, strictly: an unknown option, a missing value or a
 * stray argument is a UsageError naming it. A value may begin with '-'
 * (`--window -1:2` reaches our own check, not the parser's "ambiguous").
 * --help is the caller's (bin/postcopy.ts answers it before any parsing).
 */
export function parseCommandLine<T extends OptionSpec>(argv: string[], options: T): OptionValues<T> {
  return parseStrictly(argv, options, false).values;
}

/** As parseCommandLine, with arguments that are not options (e.g. files) allowed, in order. */
export function parseCommandLineWithArgs<T extends OptionSpec>(argv: string[], options: T): { values: OptionValues<T>; args: string[] } {
  return parseStrictly(argv, options, true);
}

function parseStrictly<T extends OptionSpec>(argv: string[], options: T, allowPositionals: boolean): { values: OptionValues<T>; args: string[] } {
  const args: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].startsWith('--') && !argv[i].includes('=') ? argv[i].slice(2) : undefined;
    if (name && options[name]?.type === 'string' && i + 1 < argv.length && /^-[\d.]/.test(argv[i + 1])) args.push(`${argv[i]}=${argv[++i]}`);
    else args.push(argv[i]);
  }
  try {
    const parsed = parseArgs({ args, options, strict: true, allowPositionals });
    return { values: parsed.values as OptionValues<T>, args: parsed.positionals };
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const quoted = /'([^']+)'/.exec(e.message)?.[1] ?? '';
    const option = quoted.split(' ')[0];
    if (e.code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') throw new UsageError(`unknown option ${option}`);
    if (e.code === 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL') throw new UsageError(`unexpected argument ${JSON.stringify(quoted)}`);
    if (e.code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE')
      throw new UsageError(/does not take/.test(e.message) ? `${option} takes no value` : `${option} needs a value`);
    throw new UsageError(e.message);
  }
}

/** An address option (unix:PATH or tcp:HOST:PORT), refused as a usage error naming the option. */
export function parseAddressOption(text: string, what: string): Address {
  try {
    return parseAddress(text);
  } catch (err) {
    throw new UsageError(`${what} ${(err as Error).message}`);
  }
}

/** An address to listen on: as parseAddressOption, and a unix socket's directory must exist (the same sentence as an output file's). */
export function parseListenOption(text: string, what: string): Address {
  const a = parseAddressOption(text, what);
  if (a.kind === 'unix') checkSocketDirectory(a.path, `${what} unix:`);
  return a;
}

/** Refuses a socket path whose directory does not exist (listen() would say EACCES or ENOENT). */
export function checkSocketDirectory(path: string, what: string): void {
  const where = dirname(path);
  if (!statSync(where, { throwIfNoEntry: false })?.isDirectory()) throw new UsageError(`${what}${path}: the directory ${where} does not exist`);
}

/** --metrics tcp:HOST:PORT (port 0: a free one). */
export function parseMetricsOption(text: string): string {
  metricsAddress(text);
  return text;
}

function metricsAddress(text: string): Extract<Address, { kind: 'tcp' }> {
  const a = parseAddressOption(text, '--metrics');
  if (a.kind !== 'tcp') throw new UsageError(`--metrics serves HTTP: give tcp:HOST:PORT, not ${JSON.stringify(text)}`);
  return a;
}

/** tcp:HOST:0 -> tcp:HOST:<a port free now>, with its metrics URL: a port that stays the same across worker restarts. */
export async function withConcretePort(address: string): Promise<{ address: string; url: string }> {
  const a = metricsAddress(address);
  // Bound once here, so that a port already taken (or a host not of this machine) fails at start-up, not later in the worker.
  const probe = createServer();
  await new Promise<void>((resolve, reject) =>
    probe
      .once('error', (err: NodeJS.ErrnoException) =>
        reject(new PostcopyError(err.code === 'EADDRINUSE' ? ErrorCode.ADDRESS_IN_USE : ErrorCode.INVALID_ADDRESS, `--metrics ${address}: ${err.message}`)),
      )
      .listen(a.port, a.host, () => resolve()),
  );
  const port = (probe.address() as AddressInfo).port;
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  return { address: formatAddress({ ...a, port }), url: metricsUrl(a.host, port) };
}

/** argv without `--name VALUE` / `--name=VALUE`. */
export function withoutOption(argv: readonly string[], name: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === name) i++;
    else if (!argv[i].startsWith(`${name}=`)) out.push(argv[i]);
  }
  return out;
}

/** Refuses a command line that lacks a required option. */
export function requireOptions(values: Record<string, unknown>, names: string[], usageLine: string): void {
  const missing = names.filter((n) => values[n] === undefined || (Array.isArray(values[n]) && (values[n] as unknown[]).length === 0));
  if (missing.length) throw new UsageError(`${missing.map((n) => `--${n}`).join(' and ')} ${missing.length > 1 ? 'are' : 'is'} required (${usageLine})`);
}

/** One of a fixed set of words. */
export function parseChoice<C extends string>(text: string | undefined, what: string, choices: readonly C[], fallback: C): C {
  if (text === undefined) return fallback;
  if (!(choices as readonly string[]).includes(text)) throw new UsageError(`${what} must be ${choices.join(', ')}; not ${JSON.stringify(text)}`);
  return text as C;
}

/** A comma-separated list of words of a fixed set (each once, in the order given); `fallback` when absent. */
export function parseChoices<C extends string>(text: string | undefined, what: string, choices: readonly C[], fallback: readonly C[]): C[] {
  if (text === undefined) return [...fallback];
  return [...new Set(text.split(',').map((x) => parseChoice(x, what, choices, choices[0])))];
}

/** "64M", "2G", "4096", "512K" -> bytes (a whole number of them, at least `min`). */
export function parseSize(text: string, what: string, min = 0): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?$/i.exec(text.trim());
  if (!m) throw new UsageError(`${what} takes a size such as 4096, 512K, 64M or 2G; not ${JSON.stringify(text)}`);
  const scale = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 }[m[2].toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const bytes = Number(m[1]) * scale;
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`${what} must be a whole number of bytes; not ${JSON.stringify(text)}`);
  if (bytes < min) throw new UsageError(`${what} must be at least ${min} bytes; not ${JSON.stringify(text)}`);
  return bytes;
}

/** A whole number from min to max; `fallback` when the option is absent. */
export function parseCount(text: string | undefined, what: string, fallback: number, max = Number.MAX_SAFE_INTEGER, min = 0): number {
  if (text === undefined) return fallback;
  const n = /^-?\d+$/.test(text.trim()) ? Number(text) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new UsageError(`${what} must be a whole number from ${min} to ${max}; not ${JSON.stringify(text)}`);
  return n;
}

/** "500ms", "5s", "2m", "1h" (a bare number is seconds) -> milliseconds. */
export function parseDuration(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text.trim());
  if (!m) throw new UsageError(`${what} takes a duration such as 500ms, 30s or 5m; not ${JSON.stringify(text)}`);
  const ms = Math.round(Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h']);
  if (ms <= 0) throw new UsageError(`${what} must be longer than 0; not ${JSON.stringify(text)}`);
  return ms;
}

/** Refuses, before any work, an output path that cannot be written (no such directory, a directory, no permission). */
export function checkWritable(path: string, what: string): void {
  const stat = statSync(path, { throwIfNoEntry: false });
  if (stat?.isDirectory()) throw new UsageError(`${what} ${path}: is a directory`);
  const where = stat ? path : dirname(path);
  if (!stat && !statSync(where, { throwIfNoEntry: false })?.isDirectory()) throw new UsageError(`${what} ${path}: the directory ${where} does not exist`);
  try {
    accessSync(where, constants.W_OK);
  } catch {
    throw new UsageError(`${what} ${path}: not writable (permission denied)`);
  }
}

/** A background rate: a size per second, or 0 for unlimited; anything that rounds to 0 bytes is refused. */
export function parseRate(text: string | undefined): number {
  if (text === undefined || text.trim() === '0') return 0;
  return parseSize(text, '--rate (bytes per second; 0 for unlimited)', 1);
}

/** The options every destination (restore, handle) takes to detect failures and recover. */
export const recoveryOptionSpec = {
  'give-up-after': { type: 'string' },
  'silence-timeout': { type: 'string' },
} as const;

/** --give-up-after and --silence-timeout -> the session's recovery options. */
export function parseRecovery(values: { 'give-up-after'?: string; 'silence-timeout'?: string }): RecoveryOptions {
  const silence = values['silence-timeout'] === undefined ? undefined : parseDuration(values['silence-timeout'], '--silence-timeout');
  return {
    ...(values['give-up-after'] !== undefined ? { giveUpAfterMs: parseDuration(values['give-up-after'], '--give-up-after') } : {}),
    ...(silence !== undefined ? { heartbeat: { intervalMs: Math.max(10, Math.min(1000, silence / 5)), silenceMs: silence }, stallTimeoutMs: silence } : {}),
  };
}

/** "--window F:B" -> pages after and before each request. */
export function parseWindow(text: string | undefined): { forward: number; backward: number } | undefined {
  if (text === undefined) return undefined;
  const m = /^(-?\d+):(-?\d+)$/.exec(text);
  if (!m) throw new UsageError(`--window takes F:B (pages after and before each request, e.g. 8:2); not ${JSON.stringify(text)}`);
  return { forward: parseCount(m[1], '--window F (pages after)', 0, 1024), backward: parseCount(m[2], '--window B (pages before)', 0, 1024) };
}

/** The options every command reading a store image takes: the host's chunk cache, and a tenant's key. */
export const storeOptionSpec = {
  'cache-dir': { type: 'string' },
  'cache-size': { type: 'string' },
  'tenant-key-file': { type: 'string' },
} as const;

/** --cache-dir, --cache-size and --tenant-key-file, for an image in a store (refused for any other). */
export function parseStoreOptions(
  values: { 'cache-dir'?: string; 'cache-size'?: string; 'tenant-key-file'?: string },
  fromStore: boolean,
): { cache: { dir?: string; maxBytes?: number }; tenant?: TenantKey } {
  for (const name of ['cache-dir', 'cache-size', 'tenant-key-file'] as const)
    if (values[name] !== undefined && !fromStore) throw new UsageError(`--${name} is for an image in a store (s3://BUCKET/PREFIX/NAME)`);
  return {
    cache: {
      ...(values['cache-dir'] !== undefined ? { dir: values['cache-dir'] } : {}),
      ...(values['cache-size'] !== undefined ? { maxBytes: parseSize(values['cache-size'], '--cache-size', 1 << 20) } : {}),
    },
    ...(values['tenant-key-file'] !== undefined ? { tenant: tenantKeyOption(values['tenant-key-file']) } : {}),
  };
}

/** --tenant-key-file F: the tenant's key, a usage mistake when the file cannot serve. */
export function tenantKeyOption(path: string): TenantKey {
  try {
    return TenantKey.fromFile(path);
  } catch (err) {
    throw new UsageError(`--tenant-key-file: ${(err as Error).message}`);
  }
}

/** The image options name one image in a store (s3://...) or files; never both. */
export function storeImageOf(images: readonly string[] | undefined): string | undefined {
  if (!images || !images.some((i) => i.startsWith('s3://'))) return undefined;
  if (images.length !== 1) throw new UsageError('an image in a store is one --image s3://BUCKET[/PREFIX]/NAME, not mixed with other --image options');
  return images[0];
}
