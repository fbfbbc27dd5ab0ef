// The token file a source and its destinations share when the user names
// none: created once (mode 0600, so no other user can read it) at a default
// place, and found there by the CLI on the same host.
import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { ErrorCode, PostcopyError } from './errors.js';

/** $POSTCOPY_TOKEN_FILE, else $XDG_CONFIG_HOME/uffd-postcopy/token, else ~/.config/uffd-postcopy/token. */
export function defaultTokenPath(): string {
  if (process.env.POSTCOPY_TOKEN_FILE) return process.env.POSTCOPY_TOKEN_FILE;
  return join(process.env.XDG_CONFIG_HOME || join(homedir(), '.config'), 'uffd-postcopy', 'token');
}

/** Reads a token file (whitespace trimmed); `what` names it in errors. */
export function readToken(path: string, what = 'the token file'): string {
  let token: string;
  try {
    token = readFileSync(path, 'utf8').trim();
  } catch (err) {
    throw Object.assign(new PostcopyError(ErrorCode.AUTH_REQUIRED, `cannot read ${what} ${path}: ${(err as Error).message}`), { path });
  }
  if (!token) throw new PostcopyError(ErrorCode.AUTH_REQUIRED, `${what} ${path} is empty`);
  return token;
}

/** The token at `path`, created there first (32 random bytes, hex, mode 0600) when there is none. */
export function ensureToken(path: string): { token: string; created: boolean } {
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  let fd: number;
  try {
    fd = openSync(path, 'wx', 0o600); // never over a file someone else made
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    if (statSync(path).mode & 0o077) throw new PostcopyError(ErrorCode.AUTH_REQUIRED, `the token file ${path} is readable by other users; chmod 600 it`);
    return { token: readToken(path), created: false };
  }
  try {
    writeSync(fd, randomBytes(32).toString('hex') + '\n');
  } finally {
    closeSync(fd);
  }
  return { token: readToken(path), created: true };
}
