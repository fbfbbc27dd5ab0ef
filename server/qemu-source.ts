// Serving a QEMU snapshot (server/qemu-snapshot.ts) to a destination QEMU as
// its postcopy migration source: the destination was started with
// `-incoming defer`, has `postcopy-ram` on and listens (`migrate-incoming`);
// this connects and speaks QEMU's own migration stream (docs/QEMU-SNAPSHOT.md,
// "Serving"). The preamble is built here: header, configuration, open return
// path, postcopy advise, the RAM setup, a discard of every RAM page (so each
// counts as missing there, whatever its own start-up put in it), and one
// package holding listen, the device state and run: the guest runs once it
// is in. Native threads (addon/qemu_source.cc) then write it and the RAM,
// requested pages first, and read the return path: no JavaScript per page.
import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { parseAddress } from '../lib/address.js';
import { ErrorCode, PostcopyError, errorOfEvent } from '../lib/errors.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { native, type NativeEvent, type ServedRegionSpec } from '../lib/native.js';
import { takeSocket } from '../lib/protocol.js';
import { Image } from '../lib/image.js';
import { Command, Section, Stream } from '../lib/qemu-stream.js';
import type { QemuSnapshotManifest } from './qemu-snapshot.js';

export interface QemuServeOptions {
  /** Pages sent after each requested one, and before it (default 8 and 0). */
  window?: { forward: number; backward: number };
  /** Stream the pages nobody asked for (default true). */
  background?: boolean;
  logger?: Logger;
  /**
   * The RAM blocks' pages from memory the caller holds, one per block in the
   * manifest's order, instead of the directory's block files: memory a
   * restore from a store fills as it is read (a page not there yet faults in
   * that restore's engine, which fetches its chunk), so QEMU runs before the
   * snapshot's RAM is here.
   */
  blocks?: ServedRegionSpec[];
  /** Called when the destination QEMU has its device state and runs. */
  onRunning?: () => void;
  /**
   * Called when the stream fails, before its threads are joined: memory they
   * may be blocked reading (`blocks` a restore fills, whose pages come only
   * while this process's event loop turns) must be let go first, or the join
   * would wait for ever.
   */
  onFailure?: () => void;
}

export interface QemuServeReport {
  requests: number;
  /** Request read from the return path to its page written to the socket, in µs. */
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
const command = (cmd: number, data: Buffer = Buffer.alloc(0)) => Buffer.concat([Buffer.from([Section.command]), be16(cmd), be16(data.length), data]);

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

/** Everything before the RAM: header .. the package with listen, the device state and run. */
function preamble(dir: string, manifest: QemuSnapshotManifest): Buffer {
  const file = (name: string) => readFileSync(join(dir, name));
  const discards = manifest.blocks.map((b) => {
    const name = Buffer.from(b.name, 'latin1');
    // Version 0, the block's name (counted, then a NUL), then (start, length) in bytes: the whole block.
    return command(Command.postcopyRamDiscard, Buffer.concat([Buffer.from([0, name.length]), name, Buffer.from([0]), be64(0), be64(b.length)]));
  });
  const pkg = Buffer.concat([command(Command.postcopyListen), file(manifest.files.devices), command(Command.postcopyRun)]);
  if (pkg.length > Stream.maxPackaged)
    throw new PostcopyError(ErrorCode.UNSUPPORTED, `the device state is ${pkg.length} bytes; QEMU takes at most ${Stream.maxPackaged} in one package`);
  return Buffer.concat([
    be32(Stream.magic),
    be32(Stream.version),
    file(manifest.files.configuration),
    command(Command.openReturnPath),
    command(Command.postcopyAdvise, Buffer.concat([be64(4096), be64(4096)])), // the RAM's page sizes (all 4 KiB), and the target's
    file(manifest.files.ramSetup),
    ...discards,
    command(Command.packaged, be32(pkg.length)),
    pkg,
  ]);
}

/**
 * A snapshot opened to be served: its manifest read, its stream's preamble
 * built and its RAM files mapped. `qemu restore` opens it while QEMU starts,
 * so that from `migrate-incoming` on only the connection and the stream are
 * left.
 */
export class QemuSnapshotSource {
  readonly #manifest: QemuSnapshotManifest;
  readonly #section: number;
  readonly #stream: Buffer;
  readonly #image: Image | null;
  readonly #specs: ServedRegionSpec[];

  /** `blocks`: the RAM from memory the caller holds (QemuServeOptions.blocks) instead of the directory's block files. */
  constructor(dir: string, blocks?: ServedRegionSpec[]) {
    this.#manifest = readManifest(dir);
    this.#section = readFileSync(join(dir, this.#manifest.files.ramSetup)).readUInt32BE(1);
    this.#stream = preamble(dir, this.#manifest);
    this.#image = blocks ? null : Image.open(this.#manifest.blocks.map((b) => ({ path: join(dir, b.file), name: b.name })));
    try {
      this.#specs = blocks ?? this.#image!.regions.map((r) => r.spec);
      if (this.#specs.length !== this.#manifest.blocks.length)
        throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${this.#specs.length} RAM blocks given for a snapshot of ${this.#manifest.blocks.length}`);
      this.#specs.forEach((spec, i) => {
        if (spec.length !== this.#manifest.blocks[i].length)
          throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${this.#manifest.blocks[i].file} is not ${this.#manifest.blocks[i].length} bytes`);
      });
    } catch (err) {
      this.close();
      throw err;
    }
  }

  close(): void {
    this.#image?.close();
  }

  /** Serves the snapshot to the destination QEMU listening at `address` (unix:PATH or tcp:HOST:PORT) until it has every page. */
  async serve(address: string, options: Omit<QemuServeOptions, 'blocks'> = {}): Promise<QemuServeReport> {
    const log = options.logger ?? silentLogger;
    const manifest = this.#manifest;
    const specs = this.#specs;
    const section = this.#section;
    const stream = this.#stream;
    const a = parseAddress(address);
    const socket: Socket = a.kind === 'unix' ? connect(a.path) : connect(a.port, a.host);
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
    // Native threads own the connection from here: they write and read every byte.
    const fd = takeSocket(socket);
    const window = options.window ?? { forward: 8, backward: 0 };
    let settle!: { resolve: () => void; reject: (e: Error) => void };
    const finished = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
    const onEvent = (e: NativeEvent) => {
      if (e.type === 'running') options.onRunning?.();
      if (e.type === 'running')
        log.info({ guestRunningMs: Math.round(e.afterNs / 1e4) / 100 }, 'the destination QEMU has its device state and runs; its memory follows on demand');
      else if (e.type === 'done')
        e.status === 0
          ? settle.resolve()
          : settle.reject(new PostcopyError(ErrorCode.PEER_GONE, `the destination QEMU ended the migration with status ${e.status}`));
      else if (e.type === 'error') settle.reject(errorOfEvent(e, e.message ?? 'the QEMU stream failed', ErrorCode.PEER_GONE, {}));
    };
    const ram = new native.QemuRamStream({
      fd,
      preamble: stream,
      section,
      blocks: specs.map((spec, i) => ({ name: manifest.blocks[i].name, spec })),
      windowForward: window.forward,
      windowBackward: window.backward,
      background: options.background !== false,
      onEvent,
    });
    try {
      ram.start();
      await finished;
    } catch (err) {
      options.onFailure?.();
      throw err;
    } finally {
      ram.stop();
    }
    const s = ram.stats();
    const us = (ns: number) => Math.round(ns / 100) / 10;
    return {
      requests: s.requests,
      requestLatencyUs: { p50: us(s.requestP50Ns), p90: us(s.requestP90Ns), p99: us(s.requestP99Ns) },
      pagesOnDemand: s.pagesOnDemand,
      pagesWindow: s.pagesWindow,
      pagesBackground: s.pagesBackground,
      zeroPages: s.zeroPages,
      bytesSent: s.bytesSent,
      guestRunningMs: Math.round(s.preambleNs / 1e4) / 100,
      fullResidencyMs: Math.round(s.residentNs / 1e4) / 100,
    };
  }
}

/** Serves `dir` to the destination QEMU listening at `address` (unix:PATH or tcp:HOST:PORT) until it has every page. */
export async function serveQemuSnapshot(dir: string, address: string, options: QemuServeOptions = {}): Promise<QemuServeReport> {
  const source = new QemuSnapshotSource(dir, options.blocks);
  try {
    return await source.serve(address, options);
  } finally {
    source.close();
  }
}
