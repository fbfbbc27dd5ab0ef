// The VMM handler as two processes, so that a crash, a kill -9 or an upgrade
// of the part that serves pages is only a pause for the VMMs. The supervisor
// is small and does no I/O per page: it listens for VMMs, receives each
// handshake (its JSON and the userfaultfd), keeps a reference to the VMM's
// connection and userfaultfd for as long as the VMM lives, and hands both to
// a worker process (a VmmHandler) over a private socket (docs/PROTOCOL.md,
// "Handler supervisor and worker"). When the worker dies, the supervisor starts
// another and hands it every VMM again; the new worker reads what is already
// resident from each VMM's pagemap and wakes threads left waiting.
//
// Because the supervisor holds the userfaultfds, a dying worker never closes
// them: a VMM's faulting threads keep waiting (instead of reading zeros) until
// the next worker serves them. The other way round, a worker whose supervisor
// died keeps serving the VMMs it holds until each hangs up, then exits
// (bin/handle.ts): losing either process costs a VMM at most a pause.
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { closeSync } from 'node:fs';
import { createServer, Socket as NetSocket, type Server, type Socket } from 'node:net';
import { createInterface } from 'node:readline';
import { asCodedError } from '../lib/errors.js';
import { receiveFds, sendFds, socketFd, socketPair } from '../lib/fd-passing.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { listenOwnerOnly } from '../lib/unix-socket.js';
import { PendingHandshakes, acceptVmm, type VmmHandler } from './vmm-handler.js';

/** One handoff, supervisor -> worker, as JSON with [vmmSocket, uffd] attached (and the guest's memory file third, in MINOR mode). */
export interface HandoffMessage {
  id: number;
  pid: number;
  /** The VMM's handshake JSON, as it sent it. */
  handshake: string;
  /** The VMM was served by a worker that died. */
  takeover: boolean;
}

/** Supervisor -> worker, no fds: a VMM's handshake was refused before any handoff (counted in the worker's errors). */
export interface RefusedMessage {
  refused: string;
}

/** Lines a worker prints on stdout about a handoff: the VMM was refused or its session ended. */
export interface HandoffEnded {
  handoffEnded: number;
}

export interface SupervisorOptions {
  /** argv of the worker; it finds the supervisor's socket as fd 3. */
  workerCommand: string[];
  logger?: Logger;
  /** A VMM that connects but sends no handshake within this is dropped (default 10 s). */
  handshakeTimeoutMs?: number;
  /** First delay before restarting a dead worker, doubled while it keeps dying young (default 100 ms, at most 5 s). */
  restartDelayMs?: number;
}

interface HeldVmm {
  id: number;
  pid: number;
  socket: Socket;
  uffd: number;
  memfd?: number;
  handshake: Buffer;
  servedBefore: boolean;
}

/** Events: 'worker-started' (pid), 'worker-died' ({pid, code, signal}), 'line' (a worker's stdout line that is not ours). */
export class HandlerSupervisor extends EventEmitter {
  readonly #options: SupervisorOptions;
  readonly #log: Logger;
  readonly #vmms = new Map<number, HeldVmm>();
  readonly #pending = new PendingHandshakes();
  #server: Server | null = null;
  #worker: ChildProcess | null = null;
  #link = -1; // our end of the worker's socket
  #nextId = 1;
  #closing = false;
  #restarts = 0;
  #workerStartedAt = 0;

  constructor(options: SupervisorOptions) {
    super();
    this.#options = options;
    this.#log = options.logger ?? silentLogger;
  }

  get workerPid(): number | undefined {
    return this.#worker?.pid;
  }

  /** Starts the worker and listens on `path` (created 0600). */
  async listen(path: string): Promise<void> {
    // pauseOnConnect: no JS read may take the handshake (and its fd) from us.
    const server = createServer({ pauseOnConnect: true }, (socket) => void this.#onVmm(socket));
    await listenOwnerOnly(server, path);
    this.#server = server;
    this.#startWorker();
    this.#log.info({ socket: path }, 'supervisor waiting for VMMs');
  }

  async close(): Promise<void> {
    this.#closing = true;
    const server = this.#server;
    this.#server = null;
    this.#pending.dropAll();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    const worker = this.#worker;
    if (worker && worker.exitCode === null && worker.signalCode === null) {
      const exited = new Promise((resolve) => worker.once('exit', resolve));
      worker.kill('SIGTERM');
      const timer = setTimeout(() => worker.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    }
    for (const vmm of [...this.#vmms.values()]) this.#forget(vmm, 'supervisor closing');
  }

  async #onVmm(socket: Socket): Promise<void> {
    let pid = 0;
    try {
      const accepted = await acceptVmm(socket, this.#pending, this.#options.handshakeTimeoutMs ?? 10_000);
      pid = accepted.pid;
      const vmm: HeldVmm = {
        id: this.#nextId++,
        pid,
        socket,
        uffd: accepted.uffd,
        ...(accepted.memfd !== undefined ? { memfd: accepted.memfd } : {}),
        handshake: accepted.payload,
        servedBefore: false,
      };
      this.#vmms.set(vmm.id, vmm);
      // The VMM's hang-up is seen here too (it sends nothing after its handshake).
      socket.once('close', () => this.#forget(vmm, 'the VMM hung up'));
      socket.resume();
      this.#handOver(vmm);
    } catch (err) {
      const e = asCodedError(err);
      this.#log.warn({ vmmPid: (err as { vmmPid?: number }).vmmPid ?? pid, code: e.code, err: e.message }, 'VMM handshake refused; connection closed');
      socket.destroy();
      // The worker keeps the figures (its metrics); with no worker running, this one goes uncounted.
      if (this.#link >= 0) {
        try {
          sendFds(this.#link, Buffer.from(JSON.stringify({ refused: e.code } satisfies RefusedMessage)));
        } catch {
          // the worker is going away
        }
      }
    }
  }

  /** Hands a VMM to the running worker; with none running, the next worker gets it. */
  #handOver(vmm: HeldVmm): void {
    if (this.#link < 0) return;
    const fd = socketFd(vmm.socket);
    if (fd < 0) return this.#forget(vmm, 'the VMM hung up');
    const message: HandoffMessage = { id: vmm.id, pid: vmm.pid, handshake: vmm.handshake.toString('utf8'), takeover: vmm.servedBefore };
    try {
      sendFds(this.#link, Buffer.from(JSON.stringify(message)), [fd, vmm.uffd, ...(vmm.memfd !== undefined ? [vmm.memfd] : [])]);
      vmm.servedBefore = true;
    } catch (err) {
      // The worker is going away; its successor gets this VMM.
      this.#log.warn({ vmmPid: vmm.pid, err: (err as Error).message }, 'handing a VMM to the worker failed');
    }
  }

  #forget(vmm: HeldVmm, reason: string): void {
    if (!this.#vmms.delete(vmm.id)) return;
    closeSync(vmm.uffd);
    if (vmm.memfd !== undefined) closeSync(vmm.memfd);
    vmm.socket.destroy();
    this.#log.info({ vmmPid: vmm.pid, reason }, 'supervisor let go of a VMM');
  }

  #startWorker(): void {
    const [ours, theirs] = socketPair('seqpacket'); // one handoff per message, whatever its size
    const [cmd, ...args] = this.#options.workerCommand;
    const worker = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'inherit', theirs] });
    closeSync(theirs);
    this.#worker = worker;
    this.#link = ours;
    this.#workerStartedAt = Date.now();
    this.#log.info({ workerPid: worker.pid, restarts: this.#restarts }, 'worker started');
    this.emit('worker-started', worker.pid);
    createInterface({ input: worker.stdout! }).on('line', (line) => this.#onWorkerLine(line));
    worker.once('exit', (code, signal) => this.#onWorkerExit(worker, code, signal));
    for (const vmm of this.#vmms.values()) this.#handOver(vmm);
  }

  #onWorkerLine(line: string): void {
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      parsed = null;
    }
    const ended = (parsed as HandoffEnded | null)?.handoffEnded;
    if (typeof ended === 'number') {
      const vmm = this.#vmms.get(ended);
      if (vmm) this.#forget(vmm, 'the worker ended its session');
      return;
    }
    this.emit('line', line);
  }

  #onWorkerExit(worker: ChildProcess, code: number | null, signal: NodeJS.Signals | null): void {
    if (this.#worker !== worker) return;
    closeSync(this.#link);
    this.#link = -1;
    this.#worker = null;
    if (this.#closing) return;
    // A worker that keeps dying young is restarted ever more slowly.
    const livedMs = Date.now() - this.#workerStartedAt;
    const young = livedMs < 10_000 ? this.#restarts : 0;
    const delay = Math.min(5000, (this.#options.restartDelayMs ?? 100) * 2 ** Math.min(young, 6));
    this.#restarts++;
    this.#log.warn(
      { workerPid: worker.pid, code, signal, livedMs, vmms: this.#vmms.size, restartInMs: delay },
      'worker died; its VMMs wait and are handed to a new one',
    );
    this.emit('worker-died', { pid: worker.pid, code, signal });
    setTimeout(() => {
      if (!this.#closing) this.#startWorker();
    }, delay);
  }
}

/**
 * The worker's end of the link: adopts every VMM the supervisor hands over,
 * and tells it (a HandoffEnded line on `out`) when it lets one go. Resolves
 * when the supervisor goes away (the VMMs adopted so far stay the handler's).
 */
export async function serveHandoffs(handler: VmmHandler, link: number, out: (line: string) => void, log: Logger = silentLogger): Promise<void> {
  handler.on('released', ({ handoff }: { handoff?: number }) => {
    if (handoff !== undefined) out(JSON.stringify({ handoffEnded: handoff } satisfies HandoffEnded));
  });
  for (;;) {
    let msg;
    try {
      msg = await receiveFds(link, { maxBytes: 1 << 20, maxFds: 3, timeoutMs: 1000 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ETIMEDOUT') continue;
      throw err;
    }
    if (msg.payload.length === 0) return; // the supervisor is gone
    let handoff: HandoffMessage;
    try {
      if (msg.truncated) throw new Error('a handoff larger than the limit');
      const parsed = JSON.parse(msg.payload.toString('utf8')) as HandoffMessage | RefusedMessage;
      if (msg.fds.length === 0 && typeof (parsed as RefusedMessage).refused === 'string') {
        handler.noteRefused((parsed as RefusedMessage).refused);
        continue;
      }
      handoff = parsed as HandoffMessage;
      if ((msg.fds.length !== 2 && msg.fds.length !== 3) || !Number.isSafeInteger(handoff.id) || typeof handoff.handshake !== 'string')
        throw new Error('not a handoff');
    } catch (err) {
      for (const fd of msg.fds) closeSync(fd);
      log.error({ err: (err as Error).message }, 'a malformed message from the supervisor');
      continue;
    }
    const socket = new NetSocket({ fd: msg.fds[0], readable: true, writable: true });
    void handler.adopt({
      pid: handoff.pid,
      socket,
      uffd: msg.fds[1],
      ...(msg.fds.length === 3 ? { memfd: msg.fds[2] } : {}),
      payload: Buffer.from(handoff.handshake, 'utf8'),
      takeover: handoff.takeover,
      handoff: handoff.id,
    });
  }
}
