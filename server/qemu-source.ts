// Serving a QEMU snapshot (server/qemu-snapshot.ts) to a destination QEMU as
// its postcopy migration source: the destination was started with
// `-incoming defer`, has `postcopy-ram` on and listens (`migrate-incoming`);
// this connects and speaks QEMU's own migration stream (docs/QEMU-SNAPSHOT.md,
// "Serving"): header, configuration, open return path, postcopy advise, the
// RAM setup, a discard of every RAM page (so each counts as missing there,
// whatever its own start-up put in it), then one package holding listen, the
// device state and run: the guest runs at once. Pages then go in RAM section
// parts, requested ones (MIG_RP_MSG_REQ_PAGES on the return path) first, the
// rest in the background; then the RAM section's end, EOF, and the
// destination's shut message.
import { readFileSync, openSync, closeSync, fstatSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { parseAddress } from '../lib/address.js';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { mapFile, type Mapping } from '../lib/memory.js';
import type { QemuSnapshotManifest } from './qemu-snapshot.js';

const PAGE = 4096;
const COMMAND = 0x08;
const SECTION_PART = 0x02;
const SECTION_END = 0x03;
const FOOTER = 0x7e;
const EOF = 0x00;
const CMD_OPEN_RETURN_PATH = 1;
const CMD_POSTCOPY_ADVISE = 3;
const CMD_POSTCOPY_LISTEN = 4;
const CMD_POSTCOPY_RUN = 5;
const CMD_POSTCOPY_RAM_DISCARD = 6;
const CMD_PACKAGED = 7;
const FLAG_ZERO = 0x02;
const FLAG_PAGE = 0x08;
const FLAG_EOS = 0x10;
const FLAG_CONTINUE = 0x20;
// Return-path messages (MIG_RP_MSG_*).
const RP_SHUT = 1;
const RP_PONG = 2;
const RP_REQ_PAGES_ID = 3;
const RP_REQ_PAGES = 4;
/** Pages per background part (1 MiB: a requested page waits for at most one). */
const BACKGROUND_BATCH = 256;
const ZERO_PAGE = Buffer.alloc(PAGE);

export interface QemuServeOptions {
  /** Pages sent after each requested one, and before it (default 8 and 0). */
  window?: { forward: number; backward: number };
  /** Stream the pages nobody asked for (default true). */
  background?: boolean;
  /** Give up when the destination says nothing for this long after the last page went (default 30 s). */
  shutTimeoutMs?: number;
  logger?: Logger;
}

export interface QemuServeReport {
  requests: number;
  /** Request received to its page written to the socket, in µs. */
  requestLatencyUs: { p50: number; p90: number; p99: number };
  pagesOnDemand: number;
  pagesWindow: number;
  pagesBackground: number;
  zeroPages: number;
  bytesSent: number;
  /** From connecting to the package (listen, devices, run) written: the guest runs from then on. */
  guestRunningMs: number;
  /** From connecting to the destination's shut message: every page is there. */
  fullResidencyMs: number;
}

interface Block {
  name: string;
  length: number;
  pages: number;
  mapping: Mapping;
  bytes: Buffer;
  sent: Uint8Array;
}

const be16 = (v: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  return b;
};
const be32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
};
const be64 = (v: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};
const command = (cmd: number, data: Buffer = Buffer.alloc(0)) => Buffer.concat([Buffer.from([COMMAND]), be16(cmd), be16(data.length), data]);

/** Reads a snapshot directory's manifest, checked. */
export function readManifest(dir: string): QemuSnapshotManifest {
  let manifest: QemuSnapshotManifest;
  try {
    manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8'));
  } catch (err) {
    throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${dir} is not a QEMU snapshot (no readable manifest.json): ${(err as Error).message}`);
  }
  if (manifest.format !== 'uffd-postcopy-qemu-snapshot' || manifest.version !== 1 || !Array.isArray(manifest.blocks))
    throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${dir}/manifest.json is not a QEMU snapshot manifest this version reads`);
  return manifest;
}

/** Serves `dir` to the destination QEMU listening at `address` (unix:PATH or tcp:HOST:PORT) until it has every page. */
export async function serveQemuSnapshot(dir: string, address: string, options: QemuServeOptions = {}): Promise<QemuServeReport> {
  const log = options.logger ?? silentLogger;
  const manifest = readManifest(dir);
  const blocks: Block[] = manifest.blocks.map((b) => {
    const fd = openSync(join(dir, b.file), 'r');
    try {
      if (fstatSync(fd).size !== b.length) throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${b.file} is not ${b.length} bytes`);
      const mapping = mapFile(fd, b.length, { readOnly: true, shared: true });
      return {
        name: b.name,
        length: b.length,
        pages: b.length / PAGE,
        mapping,
        bytes: Buffer.from(mapping.buffer().buffer, mapping.buffer().byteOffset, b.length),
        sent: new Uint8Array(Math.ceil(b.length / PAGE / 8)),
      };
    } finally {
      closeSync(fd);
    }
  });
  const byName = new Map(blocks.map((b) => [b.name, b]));
  const ramSetup = readFileSync(join(dir, manifest.files.ramSetup));
  const ramSection = ramSetup.readUInt32BE(1);
  const a = parseAddress(address);
  const socket: Socket = a.kind === 'unix' ? connect(a.path) : connect(a.port, a.host);
  socket.setNoDelay?.(true);
  const started = performance.now();
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (err: NodeJS.ErrnoException) =>
        reject(
          Object.assign(new PostcopyError(ErrorCode.SOURCE_UNREACHABLE, `the destination QEMU does not listen at ${address}: ${err.message}`), {
            errno: err.errno,
          }),
        ),
      );
    });
    return await new QemuSession(socket, blocks, byName, ramSection, manifest, dir, options, log, started).run();
  } finally {
    socket.destroy();
    for (const b of blocks) {
      try {
        b.mapping.unmap();
      } catch {
        /* unmapped when the last view goes */
      }
    }
  }
}

class QemuSession {
  readonly #requests: { block: Block; first: number; count: number; at: number }[] = [];
  readonly #latencies: number[] = [];
  #wake: (() => void) | null = null;
  #shut: ((status: number) => void) | null = null;
  #failed: Error | null = null;
  #lastBlock: Block | null = null;
  #lastRequested: Block | null = null;
  #sentPages = 0;
  readonly #totalPages: number;
  readonly #counts = { pagesOnDemand: 0, pagesWindow: 0, pagesBackground: 0, zeroPages: 0, bytesSent: 0 };

  constructor(
    readonly socket: Socket,
    readonly blocks: Block[],
    readonly byName: Map<string, Block>,
    readonly ramSection: number,
    readonly manifest: QemuSnapshotManifest,
    readonly dir: string,
    readonly options: QemuServeOptions,
    readonly log: Logger,
    readonly started: number,
  ) {
    this.#totalPages = blocks.reduce((n, b) => n + b.pages, 0);
    let pending = Buffer.alloc(0);
    socket.on('data', (d: Buffer) => {
      pending = Buffer.concat([pending, d]);
      while (pending.length >= 4) {
        const type = pending.readUInt16BE(0);
        const len = pending.readUInt16BE(2);
        if (pending.length < 4 + len) break;
        this.#onReturn(type, pending.subarray(4, 4 + len));
        pending = pending.subarray(4 + len);
      }
    });
    const gone = () => {
      if (!this.#failed) this.#failed = new PostcopyError(ErrorCode.PEER_GONE, 'the destination QEMU closed the migration connection');
      this.#wake?.();
      this.#shut?.(-1);
    };
    socket.on('close', gone);
    socket.on('error', gone);
  }

  /** A return-path message from the destination. */
  #onReturn(type: number, data: Buffer): void {
    if (type === RP_SHUT) return this.#shut?.(data.length >= 4 ? data.readUInt32BE(0) : 0);
    if (type === RP_PONG) return;
    if (type === RP_REQ_PAGES_ID || type === RP_REQ_PAGES) {
      const start = Number(data.readBigUInt64BE(0));
      const length = data.readUInt32BE(8);
      let block = this.#lastRequested;
      if (type === RP_REQ_PAGES_ID) {
        const n = data[12];
        block = this.byName.get(data.subarray(13, 13 + n).toString('latin1')) ?? null;
      }
      if (!block || start % PAGE || length === 0 || start + length > block.length) {
        this.#failed = new PostcopyError(ErrorCode.PROTOCOL_OUT_OF_RANGE, `the destination asked for pages outside the snapshot's RAM (${start}+${length})`);
        this.#wake?.();
        return;
      }
      this.#lastRequested = block;
      this.#requests.push({ block, first: start / PAGE, count: Math.ceil(length / PAGE), at: performance.now() });
      this.#wake?.();
    }
  }

  async #write(buf: Buffer): Promise<void> {
    if (this.#failed) throw this.#failed;
    this.#counts.bytesSent += buf.length;
    if (!this.socket.write(buf)) {
      await new Promise<void>((resolve) => {
        const done = () => {
          this.socket.off('drain', done);
          this.socket.off('close', done);
          resolve();
        };
        this.socket.on('drain', done);
        this.socket.on('close', done);
      });
    }
    if (this.#failed) throw this.#failed;
  }

  async run(): Promise<QemuServeReport> {
    const file = (name: string) => readFileSync(join(this.dir, name));
    const header = Buffer.concat([be32(0x5145564d), be32(3)]);
    const advise = Buffer.concat([be64(PAGE), be64(PAGE)]); // the RAM's page sizes (all 4 KiB), and the target's
    const discards = this.blocks.map((b) => {
      const name = Buffer.from(b.name, 'latin1');
      // Version 0, the block's name (counted, then a NUL), then (start, length) in bytes: the whole block.
      return command(CMD_POSTCOPY_RAM_DISCARD, Buffer.concat([Buffer.from([0, name.length]), name, Buffer.from([0]), be64(0), be64(b.length)]));
    });
    const pkg = Buffer.concat([command(CMD_POSTCOPY_LISTEN), file(this.manifest.files.devices), command(CMD_POSTCOPY_RUN)]);
    await this.#write(
      Buffer.concat([
        header,
        file(this.manifest.files.configuration),
        command(CMD_OPEN_RETURN_PATH),
        command(CMD_POSTCOPY_ADVISE, advise),
        file(this.manifest.files.ramSetup),
        ...discards,
        command(CMD_PACKAGED, be32(pkg.length)),
        pkg,
      ]),
    );
    const guestRunningMs = performance.now() - this.started;
    this.log.info({ guestRunningMs: Math.round(guestRunningMs) }, 'the destination QEMU has its device state and runs; its memory follows on demand');
    const shut = new Promise<number>((resolve) => (this.#shut = resolve));
    const window = this.options.window ?? { forward: 8, backward: 0 };
    const background = this.options.background !== false;
    let bgBlock = 0;
    let bgPage = 0;
    while (this.#sentPages < this.#totalPages) {
      if (this.#failed) throw this.#failed;
      const request = this.#requests.shift();
      if (request) {
        const { block, first, count, at } = request;
        const lo = Math.max(0, first - window.backward);
        const hi = Math.min(block.pages, first + count + window.forward);
        await this.#part(block, lo, hi, (p) => (p >= first && p < first + count ? 'demand' : 'window'));
        this.#latencies.push((performance.now() - at) * 1000);
        continue;
      }
      if (!background) {
        await new Promise<void>((resolve) => (this.#wake = resolve));
        this.#wake = null;
        continue;
      }
      // The background: the next pages not sent yet.
      while (bgBlock < this.blocks.length && bgPage >= this.blocks[bgBlock].pages) {
        bgBlock++;
        bgPage = 0;
      }
      if (bgBlock >= this.blocks.length) break;
      const block = this.blocks[bgBlock];
      const end = Math.min(block.pages, bgPage + BACKGROUND_BATCH);
      await this.#part(block, bgPage, end, () => 'background');
      bgPage = end;
    }
    // Every page is there: the RAM section's end, and EOF. The destination says shut when it is done.
    await this.#write(
      Buffer.concat([Buffer.from([SECTION_END]), be32(this.ramSection), be64(FLAG_EOS), Buffer.from([FOOTER]), be32(this.ramSection), Buffer.from([EOF])]),
    );
    const status = await Promise.race([shut, new Promise<number>((resolve) => setTimeout(() => resolve(-2), this.options.shutTimeoutMs ?? 30_000).unref())]);
    if (status === -2) throw new PostcopyError(ErrorCode.TIMEOUT, 'the destination QEMU did not say it finished (no shut on the return path)');
    if (status !== 0) throw this.#failed ?? new PostcopyError(ErrorCode.PEER_GONE, `the destination QEMU ended the migration with status ${status}`);
    const fullResidencyMs = performance.now() - this.started;
    const sorted = [...this.#latencies].sort((x, y) => x - y);
    const q = (f: number) => (sorted.length ? Math.round(sorted[Math.min(sorted.length - 1, Math.floor(f * sorted.length))] * 10) / 10 : 0);
    return {
      requests: this.#latencies.length,
      requestLatencyUs: { p50: q(0.5), p90: q(0.9), p99: q(0.99) },
      ...this.#counts,
      guestRunningMs: Math.round(guestRunningMs * 100) / 100,
      fullResidencyMs: Math.round(fullResidencyMs * 100) / 100,
    };
  }

  /** One RAM section part: pages [lo, hi) of `block` not sent yet, as PAGE or ZERO records. */
  async #part(block: Block, lo: number, hi: number, why: (p: number) => 'demand' | 'window' | 'background'): Promise<void> {
    const parts: Buffer[] = [Buffer.from([SECTION_PART]), be32(this.ramSection)];
    let any = false;
    for (let p = lo; p < hi; p++) {
      if ((block.sent[p >> 3] >> (p & 7)) & 1) continue;
      block.sent[p >> 3] |= 1 << (p & 7);
      this.#sentPages++;
      any = true;
      const page = block.bytes.subarray(p * PAGE, (p + 1) * PAGE);
      const zero = page.equals(ZERO_PAGE);
      const continues = this.#lastBlock === block;
      parts.push(be64(p * PAGE + (zero ? FLAG_ZERO : FLAG_PAGE) + (continues ? FLAG_CONTINUE : 0)));
      if (!continues) {
        const name = Buffer.from(block.name, 'latin1');
        parts.push(Buffer.from([name.length]), name);
        this.#lastBlock = block;
      }
      parts.push(zero ? Buffer.from([0]) : page);
      if (zero) this.#counts.zeroPages++;
      const kind = why(p);
      if (kind === 'demand') this.#counts.pagesOnDemand++;
      else if (kind === 'window') this.#counts.pagesWindow++;
      else this.#counts.pagesBackground++;
    }
    if (!any) return;
    parts.push(be64(FLAG_EOS), Buffer.from([FOOTER]), be32(this.ramSection));
    await this.#write(Buffer.concat(parts));
  }
}
