// Passing fds between processes over unix sockets (SCM_RIGHTS), with a payload,
// and learning who is on the other end (SO_PEERCRED).
import { native } from './native.js';
import { outOfRange } from './errors.js';
import { validateBytes, validateFd, validateInteger } from './validate.js';

/** A connected pair of unix stream sockets (close-on-exec). */
export function socketPair(): [number, number] {
  return native.socketPair();
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

export interface Received {
  /** Empty when the peer closed the socket. */
  payload: Buffer;
  /** Received fds, already close-on-exec; the caller owns them. */
  fds: number[];
  /** The payload or the fds did not fit the limits given. */
  truncated: boolean;
}

/** Waits (off the JS thread) for one message; rejects with ETIMEDOUT after `timeoutMs`. */
export function receiveFds(socket: number, options: { maxBytes?: number; maxFds?: number; timeoutMs?: number } = {}): Promise<Received> {
  validateFd(socket, 'socket');
  const maxBytes = validateInteger(options.maxBytes ?? 65536, 'options.maxBytes', 1, 1 << 24);
  const maxFds = validateInteger(options.maxFds ?? 16, 'options.maxFds', 0, native.pollConstants.MAX_FDS);
  const timeoutMs = validateInteger(options.timeoutMs ?? -1, 'options.timeoutMs', -1, 0x7fffffff);
  return native.receiveWithFds(socket, maxBytes, maxFds, timeoutMs);
}

/** The process on the other end of a unix socket, as the kernel recorded it at connect(). */
export function peerCredentials(socket: number): { pid: number; uid: number; gid: number } {
  return native.peerCredentials(validateFd(socket, 'socket'));
}
