// Addresses on the command line and in the API: unix:PATH or tcp:HOST:PORT.
import { isIP } from 'node:net';
import { ErrorCode, PostcopyError } from './errors.js';

export type Address = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/** unix:PATH or tcp:HOST:PORT (port 0: any free port, for listening); a bad one is refused naming what is wrong. */
export function parseAddress(text: string): Address {
  const bad = (why: string) => new PostcopyError(ErrorCode.INVALID_ADDRESS, `${JSON.stringify(text)}: ${why}`);
  if (typeof text !== 'string') throw bad('an address is a string: unix:PATH or tcp:HOST:PORT');
  if (text.startsWith('unix:')) {
    if (text.length === 5) throw bad('no socket path after unix:');
    return { kind: 'unix', path: text.slice(5) };
  }
  if (!text.startsWith('tcp:')) throw bad('not an address (expected unix:PATH or tcp:HOST:PORT)');
  const m = /^tcp:(\[[^\]]+\]|[^:[\]]+)(?::(.*))?$/.exec(text);
  if (!m || m[1] === '') throw bad('no host (expected tcp:HOST:PORT)');
  if (m[2] === undefined || m[2] === '') throw bad(`no port after the host (expected tcp:${m[1]}:PORT)`);
  if (!/^\d+$/.test(m[2])) throw bad(`port ${JSON.stringify(m[2])} is not a number`);
  const port = Number(m[2]);
  if (port > 65535) throw bad(`port ${port} is out of range (0 to 65535)`);
  return { kind: 'tcp', host: m[1].replace(/^\[|\]$/g, ''), port };
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
