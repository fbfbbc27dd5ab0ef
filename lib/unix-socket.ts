// Listening on a unix socket path that only this user may connect to.
import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import { connect, type Server } from 'node:net';
import { ErrorCode, PostcopyError } from './errors.js';

/** The longest path a unix socket address holds (sun_path, less its terminating NUL). */
export const MAX_SOCKET_PATH = 107;

/**
 * Listens on `path`, created mode 0600 (no window where others could
 * connect). A socket file left by a process that is gone is replaced; one a
 * live process listens on is refused (ERR_ADDRESS_IN_USE), as is a path too
 * long for the kernel (ERR_INVALID_ADDRESS), before anything is created.
 */
export async function listenOwnerOnly(server: Server, path: string): Promise<void> {
  const bytes = Buffer.byteLength(path);
  if (bytes === 0 || bytes > MAX_SOCKET_PATH) {
    throw new PostcopyError(
      ErrorCode.INVALID_ADDRESS,
      `the socket path ${JSON.stringify(path)} is ${bytes} bytes; a unix socket path holds 1 to ${MAX_SOCKET_PATH}`,
    );
  }
  let existing = false;
  try {
    existing = lstatSync(path).isSocket();
  } catch {
    // nothing there
  }
  if (existing) {
    if (await someoneListens(path)) throw new PostcopyError(ErrorCode.ADDRESS_IN_USE, `another process is listening on ${path}; refusing to take it over`);
    unlinkSync(path); // stale: its process is gone
  }
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(
        Object.assign(
          new PostcopyError(err.code === 'EADDRINUSE' ? ErrorCode.ADDRESS_IN_USE : ErrorCode.INVALID_ADDRESS, `cannot listen on ${path}: ${err.message}`),
          { errno: err.errno, syscall: err.syscall },
        ),
      ),
    );
    // The socket file is created (bound) within listen() itself: the umask is
    // narrowed for that call only, never across an await, where files other
    // code creates meanwhile (a compiled program) would lose their modes.
    const oldUmask = process.umask(0o177);
    try {
      server.listen(path, resolve);
    } finally {
      process.umask(oldUmask);
    }
  });
  try {
    chmodSync(path, 0o600);
  } catch (err) {
    server.close();
    throw err;
  }
}

/** True when a process accepts connections on the socket at `path`. */
function someoneListens(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = connect(path);
    const done = (alive: boolean) => {
      probe.destroy();
      resolve(alive);
    };
    probe.once('connect', () => done(true));
    probe.once('error', () => done(false)); // ECONNREFUSED: nobody
    probe.setTimeout(1000, () => done(true)); // a backlog so full it cannot answer is still someone's
  });
}
