// Listening on a unix socket path that only this user may connect to.
import { chmodSync, lstatSync, unlinkSync } from 'node:fs';
import type { Server } from 'node:net';

/**
 * Listens on `path`, created mode 0600 (no window where others could
 * connect). A socket file left by a process that is gone is replaced.
 */
export async function listenOwnerOnly(server: Server, path: string): Promise<void> {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // nothing there
  }
  const oldUmask = process.umask(0o177);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(path, resolve);
    });
  } finally {
    process.umask(oldUmask);
  }
  chmodSync(path, 0o600);
}
