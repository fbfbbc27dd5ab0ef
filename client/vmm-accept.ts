// A VMM's connection until its handshake is in: who it is (SO_PEERCRED), its
// handshake JSON and the fds that came with it (docs/VMM-HANDSHAKE.md), with
// a bound on how many may still be silent at once.
import { closeSync, fstatSync } from 'node:fs';
import type { Socket } from 'node:net';
import { ErrorCode, PostcopyError, asCodedError } from '../lib/errors.js';
import { isUserfaultfd } from '../lib/vmm-handshake.js';
import { receiveFds, peerCredentials, socketFd } from '../lib/fd-passing.js';

/** A VMM's connection, its userfaultfd and its handshake JSON, ready to be served. */
export interface VmmHandoff {
  pid: number;
  socket: Socket;
  uffd: number;
  /** The guest's memory file, when the VMM sent one (MINOR mode). */
  memfd?: number;
  payload: Buffer;
  takeover?: boolean;
  /** The supervisor's number for this VMM, echoed in 'released'. */
  handoff?: number;
}

/** Connections still to send their handshake, each with what stops the wait (before the socket is closed). */
export class PendingHandshakes extends Map<Socket, AbortController> {
  /** Stops every wait, then closes the sockets. */
  dropAll(): void {
    for (const [socket, abort] of this) {
      abort.abort();
      socket.destroy();
    }
    this.clear();
  }
}

/** The most VMM connections that may wait to send their handshake at once; more are closed at once. */
export const MAX_PENDING_HANDSHAKES = 64;

/**
 * A new VMM connection: who it is (SO_PEERCRED) and its handshake. Refused at
 * once (ERR_OVERLOADED) while MAX_PENDING_HANDSHAKES others are still silent;
 * a refusal carries `vmmPid` when known.
 */
export async function acceptVmm(socket: Socket, pending: PendingHandshakes, timeoutMs: number): Promise<VmmHandoff> {
  socket.on('error', () => {});
  const fd = socketFd(socket);
  let pid = 0;
  try {
    pid = peerCredentials(fd).pid;
    if (pending.size >= MAX_PENDING_HANDSHAKES)
      throw new PostcopyError(ErrorCode.OVERLOADED, `${pending.size} VMM connections are still to send their handshake`);
    const abort = new AbortController();
    pending.set(socket, abort);
    try {
      return { pid, socket, ...(await receiveHandshake(fd, timeoutMs, abort.signal)) };
    } finally {
      pending.delete(socket);
    }
  } catch (err) {
    throw Object.assign(asCodedError(err), { vmmPid: pid });
  }
}

/**
 * Reads a VMM's handshake from its socket: the JSON payload with one fd, a
 * userfaultfd, or two: the userfaultfd and the guest's memory file (a memfd or
 * shared-memory file: MINOR mode). The caller owns the returned fds.
 */
export async function receiveHandshake(fd: number, timeoutMs: number, signal?: AbortSignal): Promise<{ payload: Buffer; uffd: number; memfd?: number }> {
  const msg = await receiveFds(fd, { maxBytes: 64 << 10, maxFds: 4, timeoutMs, ...(signal ? { signal } : {}) });
  try {
    if (msg.payload.length === 0) throw new PostcopyError(ErrorCode.PEER_GONE, 'the VMM closed the socket before its handshake');
    if (msg.fds.length !== 1 && msg.fds.length !== 2)
      throw new PostcopyError(
        ErrorCode.PROTOCOL_MALFORMED,
        `the handshake must carry the userfaultfd, and at most the guest's memory file after it, not ${msg.fds.length} fds`,
      );
    if (!isUserfaultfd(msg.fds[0])) throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the fd sent is not a userfaultfd');
    if (msg.fds.length === 2 && !fstatSync(msg.fds[1]).isFile())
      throw new PostcopyError(ErrorCode.PROTOCOL_MALFORMED, 'the second fd is not a memory file (a memfd or a shared-memory file)');
  } catch (err) {
    for (const f of msg.fds) closeSync(f);
    throw err;
  }
  return { payload: msg.payload, uffd: msg.fds[0], ...(msg.fds.length === 2 ? { memfd: msg.fds[1] } : {}) };
}
