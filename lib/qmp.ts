// A client of QEMU's monitor protocol (QMP): newline-delimited JSON on a unix
// socket; a greeting, `qmp_capabilities`, then one command at a time, each
// answered with {"return": ...} or {"error": {class, desc}}; events may come
// in between. Every wait is bounded.
import { connect, type Socket } from 'node:net';
import { constants } from 'node:os';
import { setTimeout as delay } from 'node:timers/promises';
import { ErrorCode, PostcopyError } from './errors.js';

/** An event QEMU sent: its name, its data, and when it came (performance.now() here). */
export interface QmpEvent {
  event: string;
  data: unknown;
  at: number;
}

export class Qmp {
  readonly #socket: Socket;
  #buf = '';
  #waiting: { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout } | null = null;
  #queue: Promise<unknown> = Promise.resolve();
  #closed: Error | null = null;
  #greeted: (() => void) | null = null;
  /** Waits for events by name (nextEvent), each resolved with the first such event to come. */
  readonly #eventWaits = new Map<string, Set<(e: QmpEvent) => void>>();

  private constructor(socket: Socket) {
    this.#socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => this.#onData(d));
    socket.on('error', () => {});
    socket.on('close', () => {
      this.#closed = new PostcopyError(ErrorCode.QMP_FAILED, "QEMU's monitor connection closed");
      const w = this.#waiting;
      this.#waiting = null;
      if (w) {
        clearTimeout(w.timer);
        w.reject(this.#closed);
      }
    });
  }

  /**
   * Connects to QEMU's QMP socket at `path` and leaves capabilities negotiation done.
   * QEMU creates the socket file when it binds and listens a moment later, and a
   * caller may start QEMU just before: a missing or refusing socket is tried
   * again every 20 ms until `timeoutMs` has passed.
   */
  static async connect(path: string, timeoutMs = 10_000): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        return await Qmp.#connectOnce(path, Math.max(1, deadline - Date.now()));
      } catch (err) {
        const errno = Math.abs((err as { errno?: number }).errno ?? 0);
        const notYet = errno === constants.errno.ENOENT || errno === constants.errno.ECONNREFUSED;
        if (!notYet || Date.now() + 20 >= deadline) throw err;
        await delay(20);
      }
    }
  }

  static async #connectOnce(path: string, timeoutMs: number): Promise<Qmp> {
    const socket = connect(path);
    const qmp = new Qmp(socket);
    const greeted = new Promise<void>((resolve) => (qmp.#greeted = resolve));
    const timer = setTimeout(() => socket.destroy(), timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', (err: NodeJS.ErrnoException) =>
          reject(
            Object.assign(new PostcopyError(ErrorCode.QMP_FAILED, `cannot reach QEMU's monitor at ${path}: ${err.message}`), {
              errno: err.errno,
              syscall: err.syscall,
            }),
          ),
        );
      });
      await Promise.race([
        greeted,
        new Promise((_, reject) =>
          socket.once('close', () => reject(new PostcopyError(ErrorCode.QMP_FAILED, `QEMU's monitor at ${path} closed before its greeting`))),
        ),
      ]);
    } finally {
      clearTimeout(timer);
    }
    await qmp.execute('qmp_capabilities');
    return qmp;
  }

  /** Runs one command; resolves with its `return`, rejects with ERR_QMP_FAILED and QEMU's own description. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
    const run = this.#queue.then(
      () =>
        new Promise<unknown>((resolve, reject) => {
          if (this.#closed) return reject(this.#closed);
          const timer = setTimeout(() => {
            this.#waiting = null;
            reject(new PostcopyError(ErrorCode.TIMEOUT, `QEMU did not answer ${command} within ${timeoutMs} ms`));
          }, timeoutMs);
          this.#waiting = { resolve, reject, timer };
          this.#socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) }) + '\n');
        }),
    );
    this.#queue = run.catch(() => {});
    return run as Promise<T>;
  }

  /**
   * Polls `query-migrate` every `everyMs` until its status is one of
   * `states`, and resolves with that answer. A migration that failed or was
   * cancelled is ERR_QMP_FAILED; none of `states` within `timeoutMs`, ERR_TIMEOUT.
   */
  async untilMigration<T extends { status?: string }>(states: readonly string[], timeoutMs: number, everyMs = 50): Promise<T> {
    for (const end = Date.now() + timeoutMs; ;) {
      const answer = await this.execute<T>('query-migrate');
      if (answer.status && states.includes(answer.status)) return answer;
      if (answer.status === 'failed' || answer.status === 'cancelled')
        throw new PostcopyError(ErrorCode.QMP_FAILED, `QEMU says the migration ${answer.status}`);
      if (Date.now() >= end)
        throw new PostcopyError(ErrorCode.TIMEOUT, `the migration was not ${states.join(' or ')} within ${timeoutMs} ms (it is ${answer.status})`);
      await new Promise((r) => setTimeout(r, everyMs));
    }
  }

  /**
   * The next event named `name` (e.g. RESUME: the guest runs), when it comes;
   * asked before the command that causes it. ERR_TIMEOUT after `timeoutMs`,
   * ERR_QMP_FAILED if the monitor closes first.
   */
  nextEvent(name: string, timeoutMs: number): Promise<QmpEvent> {
    return new Promise<QmpEvent>((resolve, reject) => {
      if (this.#closed) return reject(this.#closed);
      const waits = this.#eventWaits.get(name) ?? new Set();
      this.#eventWaits.set(name, waits);
      const settle = (e: QmpEvent) => {
        clearTimeout(timer);
        this.#socket.off('close', onClose);
        resolve(e);
      };
      const timer = setTimeout(() => {
        waits.delete(settle);
        this.#socket.off('close', onClose);
        reject(new PostcopyError(ErrorCode.TIMEOUT, `QEMU sent no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const onClose = () => {
        clearTimeout(timer);
        waits.delete(settle);
        reject(this.#closed ?? new PostcopyError(ErrorCode.QMP_FAILED, "QEMU's monitor connection closed"));
      };
      this.#socket.once('close', onClose);
      waits.add(settle);
    });
  }

  #onData(d: string): void {
    this.#buf += d;
    for (let nl = this.#buf.indexOf('\n'); nl >= 0; nl = this.#buf.indexOf('\n')) {
      const line = this.#buf.slice(0, nl).trim();
      this.#buf = this.#buf.slice(nl + 1);
      if (!line) continue;
      let msg: { QMP?: unknown; return?: unknown; error?: { class?: string; desc?: string }; event?: string };
      try {
        msg = JSON.parse(line);
      } catch {
        continue;
      }
      if (msg.QMP) {
        this.#greeted?.();
        continue;
      }
      if (msg.event) {
        const waits = this.#eventWaits.get(msg.event);
        this.#eventWaits.delete(msg.event);
        const e = { event: msg.event, data: (msg as { data?: unknown }).data ?? null, at: performance.now() };
        for (const resolve of waits ?? []) resolve(e);
        continue;
      }
      const w = this.#waiting;
      if (!w) continue;
      this.#waiting = null;
      clearTimeout(w.timer);
      if (msg.error) w.reject(new PostcopyError(ErrorCode.QMP_FAILED, `QEMU refused: ${msg.error.desc ?? msg.error.class ?? 'an error'}`));
      else w.resolve(msg.return);
    }
  }

  close(): void {
    this.#socket.destroy();
  }
}
