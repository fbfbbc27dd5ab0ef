// Addresses on the command line and in the API: unix:PATH or tcp:HOST:PORT.
import { isIP } from 'node:net';
import { ErrorCode, PostcopyError } from './errors.js';

export type Address = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

export function parseAddress(text: string): Address {
  if (typeof text === 'string' && text.startsWith('unix:') && text.length > 5) return { kind: 'unix', path: text.slice(5) };
  const m = typeof text === 'string' ? /^tcp:(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(text) : null;
  if (m) {
    const port = Number(m[2]);
    if (port <= 65535) return { kind: 'tcp', host: m[1].replace(/^\[|\]$/g, ''), port };
  }
  throw new PostcopyError(ErrorCode.INVALID_ADDRESS, `not an address: ${JSON.stringify(text)} (expected unix:PATH or tcp:HOST:PORT)`);
}

export function formatAddress(a: Address): string {
  return a.kind === 'unix' ? `unix:${a.path}` : `tcp:${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

/** True for unix sockets and TCP on a loopback address: nothing beyond this host can connect. */
export function isLocalOnly(a: Address): boolean {
  if (a.kind === 'unix') return true;
  if (a.host === 'localhost') return true;
  if (isIP(a.host) === 4) return a.host.startsWith('127.');
  return a.host === '::1';
}
