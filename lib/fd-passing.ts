// Passing fds between processes over unix sockets (SCM_RIGHTS), with a payload,
// and learning who is on the other end (SO_PEERCRED).
import type { Socket } from 'node:net';
import { native } from './native.js';
import { kernelError, outOfRange } from './errors.js';
import { validateBytes, validateFd, validateInteger } from './validate.js';

/** The fd beneath a connected net.Socket (libuv's handle), or -1 once it has none (closed). */
export function socketFd(socket: Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return typeof fd === 'number' ? fd : -1;
}

/** A connected pair of unix sockets (close-on-exec): stream, or seqpacket (each sendmsg arrives as one message). */
export function socketPair(kind: 'stream' | 'seqpacket' = 'stream'): [number, number] {
  return native.socketPair(kind === 'seqpacket');
}

/** Sends `payload` (non-empty) with `fds` attached in one sendmsg; returns bytes sent. */
export function sendFds(socket: number, payload: Uint8Array, fds: readonly number[] = []): number {
  validateFd(socket, 'socket');
  validateBytes(payload, 'payload');
  if (payload.byteLength === 0) throw outOfRange('payload.byteLength', '>= 1 (fds travel with at least one byte)', 0);
  if (!Array.isArray(fds) || fds.length > native.pollConstants.MAX_FDS) throw outOfRange('fds.length', `<= ${native.pollConstants.MAX_FDS}`, fds.length);
  fds.forEach((fd, i) => validateFd(fd, `fds[${i}]`));
  return native.sendWithFds(socket, payload, [...fds]);
}

/**
 * Sends `payload` as one datagram to the unix datagram socket at `path`
 * ("@name": the abstract namespace), as a service tells its manager it is
 * ready (systemd's NOTIFY_SOCKET); returns bytes sent. Kernel errors come as
 * Node's own (`ENOENT` when nothing is bound there, `ECONNREFUSED` when it is
 * not a datagram socket).
 */
export function sendDatagram(path: string, payload: Uint8Array): number {
  if (typeof path !== 'string' || path.length === 0 || Buffer.byteLength(path) > 107) throw outOfRange('path', 'a unix socket path of 1 to 107 bytes', path);
  validateBytes(payload, 'payload');
  if (payload.byteLength === 0 || payload.byteLength > 65_536) throw outOfRange('payload.byteLength', '1 to 65536', payload.byteLength);
  return native.sendDatagram(path, payload);
}

export interface Received {
  /** Empty when the peer closed the socket. */
  payload: Buffer;
  /** Received fds, already close-on-exec; the caller owns them. */
  fds: number[];
  /** The payload or the fds did not fit the limits given. */
  truncated: boolean;
}

/**
 * Waits for one message; rejects with ETIMEDOUT after `timeoutMs`, or with
 * ABORT_ERR when `signal` aborts (abort before closing the socket). The wait
 * takes no thread of the libuv pool (one native epoll thread serves every
 * waiting socket), so idle peers cannot starve other work.
 */
export function receiveFds(socket: number, options: { maxBytes?: number; maxFds?: number; timeoutMs?: number; signal?: AbortSignal } = {}): Promise<Received> {
  validateFd(socket, 'socket');
  const maxBytes = validateInteger(options.maxBytes ?? 65536, 'options.maxBytes', 1, 1 << 24);
  const maxFds = validateInteger(options.maxFds ?? 16, 'options.maxFds', 0, native.pollConstants.MAX_FDS);
  const timeoutMs = validateInteger(options.timeoutMs ?? -1, 'options.timeoutMs', -1, 0x7fffffff);
  return readable(socket, timeoutMs, options.signal).then((ready) => {
    if (!ready) throw kernelError('ETIMEDOUT', -110, 'poll', `no message within ${timeoutMs} ms`);
    return native.receiveNow(socket, maxBytes, maxFds);
  });
}

let watcher: { watch(fd: number, timeoutMs: number, id: number): void; cancel(id: number): void } | null = null;
const waiting = new Map<number, (ready: boolean) => void>();
let nextWait = 1;

/** Resolves true once `fd` is readable (or hung up), false after `timeoutMs` (-1: never). */
function readable(fd: number, timeoutMs: number, signal?: AbortSignal): Promise<boolean> {
  watcher ??= new native.FdWatcher(({ id, ready }) => {
    const settle = waiting.get(id);
    waiting.delete(id);
    settle?.(ready);
  });
  const id = nextWait++;
  return new Promise((resolve, reject) => {
    const aborted = () => {
      watcher!.cancel(id);
      waiting.delete(id);
      reject(Object.assign(new Error('the wait was aborted'), { code: 'ABORT_ERR', name: 'AbortError' }));
    };
    if (signal?.aborted) return aborted();
    waiting.set(id, (ready) => {
      signal?.removeEventListener('abort', aborted);
      resolve(ready);
    });
    signal?.addEventListener('abort', aborted, { once: true });
    watcher!.watch(fd, timeoutMs, id);
  });
}

/** The process on the other end of a unix socket, as the kernel recorded it at connect(). */
export function peerCredentials(socket: number): { pid: number; uid: number; gid: number } {
  return native.peerCredentials(validateFd(socket, 'socket'));
}
