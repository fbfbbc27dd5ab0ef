// What serve and handle do for whatever runs them as a service: say when they
// serve and when they stop (the manager's NOTIFY_SOCKET), and keep --pidfile.
import { ServiceNotifier } from '../lib/service-notify.js';
import { writePidFile } from '../lib/pidfile.js';
import type { Logger } from '../lib/logger.js';
import { checkWritable } from './options.js';

export const serviceOptionSpec = {
  pidfile: { type: 'string' },
} as const;

export interface Service {
  /** It serves now: the pid file, then READY=1 with `status`. */
  ready(status: string): void;
  /** What it does now, for `systemctl status`. */
  status(status: string): void;
  /** It begins to shut down. */
  stopping(status?: string): void;
}

/**
 * Checks --pidfile before any work (its directory must exist: a usage error
 * otherwise) and takes NOTIFY_SOCKET, so that no child speaks for this process.
 */
export function asService(pidfile: string | undefined, log: Logger): Service {
  if (pidfile !== undefined) checkWritable(pidfile, '--pidfile');
  const manager = ServiceNotifier.fromEnvironment(log);
  return {
    ready(status) {
      if (pidfile !== undefined) writePidFile(pidfile);
      manager.ready(status);
    },
    status(status) {
      manager.status(status);
    },
    stopping(status) {
      manager.stopping(status);
    },
  };
}
