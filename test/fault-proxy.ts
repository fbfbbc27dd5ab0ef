// Fault injection for the tests: a loopback TCP proxy in front of a source
// that forwards every connection byte for byte until a planned fault hits one
// of them. Connections are numbered in the order they are accepted (a fresh
// destination opens control, urgent, bulk: 0, 1, 2; a resume opens the next
// three). A fault fires once the chosen direction has carried `afterBytes`:
//   fin        both sides get an orderly close
//   rst        both sides get a reset (a source on a unix socket: a close)
//   blackhole  nothing more is forwarded either way; both sockets stay open
//              (a link that went silent with no FIN and no RST)
//   flip       the byte at that offset is inverted and everything goes on
//              (a link, or a man in the middle, that tampers)
// The proxy listens on 127.0.0.1 only and closes everything at teardown.
import { connect, createServer, type Server, type Socket } from 'node:net';
import { once } from 'node:events';
import type { Test } from 'tap';

export type FaultAction = 'fin' | 'rst' | 'blackhole' | 'flip';
export type Direction = 'down' | 'up'; // down: source -> destination

/** A fault for whichever connection first carries `afterBytes` in its direction. */
export const ANY_CONNECTION = -1;

export interface Fault {
  /** The connection's index in accept order, or ANY_CONNECTION. */
  connection: number;
  direction: Direction;
  afterBytes: number;
  action: FaultAction;
  /**
   * Only a connection whose first bytes up (its attach frame) hold this text,
   * e.g. 'bulk': which data channel connects first is a race.
   */
  carrying?: string;
}

export class FaultProxy {
  readonly #server: Server;
  readonly #target: { host: string; port: number } | { path: string };
  readonly #sockets = new Set<Socket>();
  readonly #carried = new Map<string, number>(); // `${connection}:${direction}` -> bytes forwarded
  #faults: Fault[] = [];
  #accepted = 0;
  #capture = false;
  /** Every chunk forwarded, either way, once capture() was called. */
  readonly captured: Buffer[] = [];

  /** Keeps a copy of every byte forwarded from now on (for checking what crosses the link). */
  capture(): void {
    this.#capture = true;
  }

  /** Faults that fired, in order. */
  readonly fired: (Fault & { at: number })[] = [];
  port = 0;

  private constructor(target: { host: string; port: number } | { path: string }) {
    this.#target = target;
    this.#server = createServer((client) => this.#onConnection(client));
  }

  /**
   * A proxy to `target` ("tcp:HOST:PORT" or "unix:PATH"), closed at the test's
   * teardown. It listens on a free loopback TCP port, or on the unix socket
   * `listenPath` (a destination that must see a unix source, unsealed).
   */
  static async start(t: Test, target: string, listenPath?: string): Promise<FaultProxy> {
    const m = /^tcp:(.+):(\d+)$/.exec(target);
    const proxy = new FaultProxy(m ? { host: m[1], port: Number(m[2]) } : { path: target.replace(/^unix:/, '') });
    if (listenPath) proxy.#server.listen(listenPath);
    else proxy.#server.listen(0, '127.0.0.1');
    await once(proxy.#server, 'listening');
    if (listenPath) proxy.#listenPath = listenPath;
    else proxy.port = (proxy.#server.address() as { port: number }).port;
    t.teardown(() => proxy.close());
    return proxy;
  }

  #listenPath = '';

  get address(): string {
    return this.#listenPath ? `unix:${this.#listenPath}` : `tcp:127.0.0.1:${this.port}`;
  }

  /** Bytes forwarded in `direction` over every connection so far. */
  carriedInAll(direction: Direction): number {
    let n = 0;
    for (const [key, bytes] of this.#carried) if (key.endsWith(`:${direction}`)) n += bytes;
    return n;
  }

  /**
   * Resolves as soon as all connections together have forwarded `bytes` in
   * `direction` (checked as each chunk goes through, so a test can act at a
   * chosen point of the transfer rather than after a guessed time).
   */
  whenCarried(direction: Direction, bytes: number): Promise<void> {
    if (this.carriedInAll(direction) >= bytes) return Promise.resolve();
    return new Promise((resolve) => this.#watchers.push({ direction, bytes, resolve }));
  }

  readonly #watchers: { direction: Direction; bytes: number; resolve: () => void }[] = [];

  #checkWatchers(): void {
    for (const w of [...this.#watchers])
      if (this.carriedInAll(w.direction) >= w.bytes) {
        this.#watchers.splice(this.#watchers.indexOf(w), 1);
        w.resolve();
      }
  }

  /** How many connections were accepted so far. */
  get accepted(): number {
    return this.#accepted;
  }

  /** Indices of the connections open now, oldest first. */
  get open(): number[] {
    return [...this.#openIndices].sort((a, b) => a - b);
  }

  readonly #openIndices = new Set<number>();

  /** Bytes connection `index` has forwarded in `direction` so far. */
  carried(index: number, direction: Direction): number {
    return this.#carried.get(`${index}:${direction}`) ?? 0;
  }

  /** Plans a fault (each fires once). */
  inject(fault: Fault): void {
    this.#faults.push(fault);
  }

  /** Applies `action` to every open connection now. */
  breakAll(action: FaultAction): void {
    for (const s of this.#sockets) s.emit('fault', action);
  }

  close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }

  #onConnection(client: Socket): void {
    const index = this.#accepted++;
    this.#openIndices.add(index);
    client.on('close', () => this.#openIndices.delete(index));
    const upstream = 'path' in this.#target ? connect(this.#target.path) : connect(this.#target.port, this.#target.host);
    client.setNoDelay(true);
    for (const s of [client, upstream]) {
      this.#sockets.add(s);
      s.on('close', () => this.#sockets.delete(s));
      s.on('error', () => {});
    }
    let head = ''; // the first bytes up, as latin1 (Fault.carrying)
    let dead = false; // nothing more is forwarded
    let applied = false;
    const apply = (action: FaultAction) => {
      dead = true;
      if (applied) return;
      applied = true;
      if (action === 'blackhole') return; // keep both open, forward nothing
      for (const s of [client, upstream]) {
        if (action === 'rst') resetOrDestroy(s);
        else s.end();
      }
    };
    client.on('fault', apply);
    upstream.on('fault', apply);
    const pipe = (from: Socket, to: Socket, direction: Direction) => {
      let carried = 0;
      const key = `${index}:${direction}`;
      from.on('data', (chunk: Buffer) => {
        if (dead) return;
        if (this.#capture) this.captured.push(Buffer.from(chunk));
        if (direction === 'up' && head.length < 512) head += chunk.subarray(0, 512 - head.length).toString('latin1');
        const fault = this.#faults.find(
          (f) => (f.connection === index || f.connection === ANY_CONNECTION) && f.direction === direction && (!f.carrying || head.includes(f.carrying)),
        );
        if (fault && fault.action === 'flip' && carried + chunk.length > fault.afterBytes) {
          chunk = Buffer.from(chunk);
          chunk[fault.afterBytes - carried] ^= 0xff;
          this.#faults.splice(this.#faults.indexOf(fault), 1);
          this.fired.push({ ...fault, at: Date.now() });
        } else if (fault && carried + chunk.length >= fault.afterBytes) {
          const keep = Math.max(0, fault.afterBytes - carried);
          if (keep > 0) to.write(chunk.subarray(0, keep));
          this.#carried.set(key, carried + keep);
          if (this.#watchers.length) this.#checkWatchers();
          this.#faults.splice(this.#faults.indexOf(fault), 1);
          this.fired.push({ ...fault, at: Date.now() });
          dead = true;
          // Let the bytes before the cut reach the other side first.
          setImmediate(() => apply(fault.action));
          return;
        }
        carried += chunk.length;
        this.#carried.set(key, carried);
        if (this.#watchers.length) this.#checkWatchers();
        if (!to.write(chunk)) {
          from.pause();
          to.once('drain', () => from.resume());
        }
      });
      from.on('end', () => {
        if (!dead) to.end();
      });
      from.on('close', () => {
        if (!dead) to.destroy();
      });
    };
    pipe(upstream, client, 'down');
    pipe(client, upstream, 'up');
  }
}

/** A TCP reset; a unix socket has none, so it is simply destroyed (the peer reads EOF or ECONNRESET). */
function resetOrDestroy(socket: Socket): void {
  try {
    socket.resetAndDestroy();
  } catch {
    socket.destroy();
  }
}
