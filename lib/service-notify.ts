// Telling the service manager that runs this process how it is doing:
// systemd's readiness protocol (sd_notify), written by hand. When the manager
// set NOTIFY_SOCKET, each notice is one datagram to that unix socket ("@name":
// the abstract namespace) of newline-separated KEY=VALUE lines: READY=1 once
// the service serves, STATUS= a line for `systemctl status`, STOPPING=1 when
// it begins to shut down. No NOTIFY_SOCKET: nothing is sent.
import { sendDatagram } from './fd-passing.js';
import type { Logger } from './logger.js';

export class ServiceNotifier {
  readonly #socket: string | undefined;
  readonly #log: Logger;
  #warned = false;

  /**
   * Takes NOTIFY_SOCKET out of the environment (as sd_notify's
   * unset_environment does): the processes this one starts (the handler's
   * worker) never speak for it.
   */
  static fromEnvironment(log: Logger): ServiceNotifier {
    const socket = process.env.NOTIFY_SOCKET || undefined;
    delete process.env.NOTIFY_SOCKET;
    return new ServiceNotifier(socket, log);
  }

  constructor(socket: string | undefined, log: Logger) {
    this.#socket = socket;
    this.#log = log;
  }

  /** Whether a manager listens (NOTIFY_SOCKET was set). */
  get enabled(): boolean {
    return this.#socket !== undefined;
  }

  /** The service serves now: READY=1, this process as the main one, and what it serves. */
  ready(status: string): void {
    this.#send(['READY=1', `MAINPID=${process.pid}`, `STATUS=${status}`]);
  }

  /** A new line for `systemctl status`. */
  status(status: string): void {
    this.#send([`STATUS=${status}`]);
  }

  /** Shutdown has begun: the manager waits for the exit instead of calling it a crash. */
  stopping(status = 'shutting down'): void {
    this.#send(['STOPPING=1', `STATUS=${status}`]);
  }

  // A manager that cannot be told is no reason to stop serving: said once, then the service goes on.
  #send(fields: string[]): void {
    if (this.#socket === undefined) return;
    // One line each: a newline inside a value would start another field.
    const payload = Buffer.from(fields.map((f) => f.replace(/\n/g, ' ')).join('\n') + '\n');
    try {
      sendDatagram(this.#socket, payload);
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      const record = { notifySocket: this.#socket, code: e.code, err: e.message, sent: fields[0] };
      if (this.#warned) return void this.#log.debug(record, 'the service manager was not told');
      this.#warned = true;
      this.#log.warn(record, 'cannot tell the service manager (NOTIFY_SOCKET) how this service is doing; it serves all the same');
    }
  }
}
