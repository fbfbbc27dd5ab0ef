// A QEMU snapshot as this project holds it: a directory with each RAM block
// as a sparse image (zero pages left as holes), the migration stream's
// configuration section, RAM setup section and device-state part exactly as
// QEMU sent them, and a manifest (docs/QEMU-SNAPSHOT.md). Read from a
// migration stream as it arrives (a file QEMU saved with `migrate
// "exec:cat > FILE"`, or a migration to a socket of ours), without holding
// the RAM in memory.
//
// The stream, as QEMU 7.2 writes it for a precopy migration: "QEVM", version
// 3; the configuration section (the machine type); the `ram` section's setup
// (the block list), its parts and its end, each RAM record a big-endian u64
// (page address | flags) followed by the block's name when the block changes,
// a fill byte (ZERO) or the page (PAGE), until EOS; then the device sections,
// which are copied verbatim; then EOF and the JSON VM description.
import { closeSync, ftruncateSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { punchHole } from '../lib/memory.js';
import { Command, RamFlag, Section, Stream } from '../lib/qemu-stream.js';

const PAGE = 4096;

/** Flags of features this snapshot cannot hold, by what the user turned on. */
const UNSUPPORTED_FLAGS: [number, string][] = [
  [RamFlag.full, 'full-ram records (a QEMU older than 1.0)'],
  [RamFlag.xbzrle, 'xbzrle (the xbzrle capability)'],
  [RamFlag.hook, 'RDMA (an rdma: migration)'],
  [RamFlag.compressPage, 'compression (the compress capability)'],
  [RamFlag.multifdFlush, 'multifd (the multifd capability)'],
];
// Commands a precopy stream may carry that change nothing here (open return path, ping, postcopy advise).
const HARMLESS_COMMANDS = new Set<number>([Command.openReturnPath, Command.ping, Command.postcopyAdvise]);

export interface QemuSnapshotManifest {
  format: 'uffd-postcopy-qemu-snapshot';
  version: 1;
  /** QEMU's version, when the snapshot was taken from a running QEMU (save); null from a file (import). */
  qemuVersion: string | null;
  machine: string;
  streamVersion: number;
  blocks: { name: string; length: number; pageSize: number; file: string; dataPages: number; zeroPages: number }[];
  /** The stream's parts kept verbatim, by file. */
  files: { configuration: string; ramSetup: string; devices: string; vmDescription: string | null };
  bytesRead: number;
}

/** Pulls bytes from an async stream of Buffers, in order, with a running position. */
class StreamReader {
  readonly #chunks: AsyncIterator<Buffer>;
  #buf: Buffer = Buffer.alloc(0);
  #at = 0;
  position = 0;
  /** When set, every byte read is kept here too (a part copied verbatim). */
  capture: Buffer[] | null = null;

  constructor(source: AsyncIterable<Buffer | string>) {
    this.#chunks = (async function* () {
      for await (const c of source) yield typeof c === 'string' ? Buffer.from(c) : c;
    })();
  }

  async #fill(n: number, what: string): Promise<void> {
    while (this.#buf.length - this.#at < n) {
      const next = await this.#chunks.next();
      if (next.done) throw new PostcopyError(ErrorCode.QEMU_STREAM_TRUNCATED, `the stream ends inside ${what} (after ${this.position} bytes)`);
      this.#buf = Buffer.concat([this.#buf.subarray(this.#at), next.value]);
      this.#at = 0;
    }
  }

  async bytes(n: number, what: string): Promise<Buffer> {
    await this.#fill(n, what);
    const out = this.#buf.subarray(this.#at, this.#at + n);
    this.#at += n;
    this.position += n;
    this.capture?.push(Buffer.from(out));
    return out;
  }

  async u8(what: string): Promise<number> {
    return (await this.bytes(1, what))[0];
  }

  async be16(what: string): Promise<number> {
    return (await this.bytes(2, what)).readUInt16BE(0);
  }

  async be32(what: string): Promise<number> {
    return (await this.bytes(4, what)).readUInt32BE(0);
  }

  async be64(what: string): Promise<number> {
    const v = (await this.bytes(8, what)).readBigUInt64BE(0);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `${what} is out of range (${v})`);
    return Number(v);
  }

  async name(what: string): Promise<string> {
    const n = await this.u8(what);
    return (await this.bytes(n, what)).toString('latin1');
  }

  /** Everything left, to the end of the stream. */
  async rest(): Promise<Buffer> {
    const parts = [this.#buf.subarray(this.#at)];
    for (;;) {
      const next = await this.#chunks.next();
      if (next.done) break;
      parts.push(next.value);
    }
    const out = Buffer.concat(parts);
    this.position += out.length;
    this.#buf = Buffer.alloc(0);
    this.#at = 0;
    return out;
  }
}

interface Block {
  name: string;
  length: number;
  fd: number;
  file: string;
  /** Pages written with data (a later zero record for one punches its hole again). */
  written: Uint8Array;
  dataPages: number;
  zeroPages: number;
}

/**
 * Reads a QEMU migration stream into the snapshot directory `out` (created;
 * its files are overwritten). `qemuVersion`: what QEMU said it is (save).
 * `progress`: called now and then with the bytes read so far. Refuses a
 * stream that is not QEMU's (ERR_QEMU_STREAM_INVALID), one cut short
 * (ERR_QEMU_STREAM_TRUNCATED), and features a snapshot cannot hold
 * (ERR_UNSUPPORTED, naming the capability).
 */
export async function readQemuStream(
  source: AsyncIterable<Buffer | string>,
  out: string,
  options: { qemuVersion?: string | null; progress?: (bytes: number, pages: number) => void } = {},
): Promise<QemuSnapshotManifest> {
  const r = new StreamReader(source);
  const head = await r.bytes(8, 'the stream header').catch((err) => {
    throw (err as PostcopyError).code === ErrorCode.QEMU_STREAM_TRUNCATED
      ? new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'not a QEMU migration stream (shorter than its header)')
      : err;
  });
  if (head.readUInt32BE(0) !== Stream.magic) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'not a QEMU migration stream (no "QEVM" magic)');
  const streamVersion = head.readUInt32BE(4);
  if (streamVersion !== Stream.version)
    throw new PostcopyError(ErrorCode.UNSUPPORTED, `QEMU migration stream version ${streamVersion}; this reads version ${Stream.version} (QEMU 2.x to 9.x)`);
  mkdirSync(out, { recursive: true });
  const blocks: Block[] = [];
  const byName = new Map<string, Block>();
  const files = { configuration: 'configuration.bin', ramSetup: 'ram-setup.bin', devices: 'devices.bin', vmDescription: null as string | null };
  let machine = '';
  let ramSection = -1;
  let ramDone = false;
  let pagesSeen = 0;
  let lastProgress = 0;
  // The block the last record named: QEMU continues it across section parts.
  const current: { block: Block | null } = { block: null };
  try {
    // The configuration section: the machine type.
    r.capture = [];
    if ((await r.u8('the configuration section')) !== Section.configuration)
      throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'the stream does not start with its configuration section');
    const len = await r.be32('the machine type');
    if (len > 256) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `a machine type of ${len} bytes`);
    machine = (await r.bytes(len, 'the machine type')).toString('latin1');
    writeFileSync(join(out, files.configuration), Buffer.concat(r.capture));
    r.capture = null;
    while (!ramDone) {
      const at = r.position;
      const type = await r.u8('a section header');
      if (type === Section.command) {
        const cmd = await r.be16('a command');
        const n = await r.be16('a command');
        await r.bytes(n, 'a command');
        if (!HARMLESS_COMMANDS.has(cmd))
          throw new PostcopyError(ErrorCode.UNSUPPORTED, `the stream carries migration command ${cmd} (a postcopy or COLO migration, not a saved state)`);
        continue;
      }
      if (type === Section.start) {
        r.capture = [Buffer.from([type])];
        const id = await r.be32('a section header');
        const name = await r.name('a section name');
        await r.be32('a section header');
        await r.be32('a section header');
        if (name !== 'ram') throw new PostcopyError(ErrorCode.UNSUPPORTED, `an iterable section "${name}" besides RAM (block migration, dirty bitmaps)`);
        if (ramSection >= 0) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'the RAM section starts twice');
        ramSection = id;
        await readRamSetup(r, out, blocks, byName);
        if ((await r.u8('the RAM setup footer')) !== Section.footer || (await r.be32('the RAM setup footer')) !== id)
          throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'the RAM setup section has no footer');
        writeFileSync(join(out, files.ramSetup), Buffer.concat(r.capture));
        r.capture = null;
        continue;
      }
      if (type === Section.part || type === Section.end) {
        const id = await r.be32('a section header');
        if (id !== ramSection) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `a part of section ${id}, which never started`);
        pagesSeen += await readRamPart(r, byName, current, () => {
          if (options.progress && r.position - lastProgress > 64 << 20) {
            lastProgress = r.position;
            options.progress(r.position, pagesSeen);
          }
        });
        if ((await r.u8('a RAM footer')) !== Section.footer || (await r.be32('a RAM footer')) !== id)
          throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'a RAM section part has no footer');
        if (type === Section.end) ramDone = true;
        continue;
      }
      if (type === Section.full || type === Section.eof)
        throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `device state before the RAM section ended (at byte ${at})`);
      throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `an unknown section type 0x${type.toString(16)} at byte ${at}`);
    }
    // The device sections, EOF, and the VM description after it (JSON) when QEMU sent one.
    const rest = await r.rest();
    const eof = findEof(rest);
    writeFileSync(join(out, files.devices), rest.subarray(0, eof));
    files.vmDescription = 'vmstate.json';
    writeFileSync(join(out, files.vmDescription), rest.subarray(eof + 6));
    for (const b of blocks) closeSync(b.fd);
    const manifest: QemuSnapshotManifest = {
      format: 'uffd-postcopy-qemu-snapshot',
      version: 1,
      qemuVersion: options.qemuVersion ?? null,
      machine,
      streamVersion,
      blocks: blocks.map((b) => ({ name: b.name, length: b.length, pageSize: PAGE, file: b.file, dataPages: b.dataPages, zeroPages: b.zeroPages })),
      files,
      bytesRead: r.position,
    };
    writeFileSync(join(out, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    return manifest;
  } catch (err) {
    for (const b of blocks) {
      try {
        closeSync(b.fd);
      } catch {
        /* closed already */
      }
    }
    throw err;
  }
}

/** The RAM setup: the total size, then each block's name and used length, until their sum is the total; then EOS. */
async function readRamSetup(r: StreamReader, out: string, blocks: Block[], byName: Map<string, Block>): Promise<void> {
  const head = await r.be64('the RAM setup');
  if ((head & 0xfff) !== RamFlag.memSize) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'the RAM setup does not begin with its size');
  const total = head - RamFlag.memSize;
  let sum = 0;
  while (sum < total) {
    const name = await r.name('a RAM block name');
    const length = await r.be64('a RAM block length');
    if (length % PAGE || length === 0) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `RAM block "${name}" is ${length} bytes, not whole pages`);
    if (byName.has(name)) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `RAM block "${name}" is listed twice`);
    const file = `ram-${blocks.length}.img`;
    const fd = openSync(join(out, file), 'w+', 0o600);
    ftruncateSync(fd, length);
    const block: Block = { name, length, fd, file, written: new Uint8Array(Math.ceil(length / PAGE / 8)), dataPages: 0, zeroPages: 0 };
    blocks.push(block);
    byName.set(name, block);
    sum += length;
  }
  if (sum !== total)
    throw new PostcopyError(
      ErrorCode.UNSUPPORTED,
      'the RAM blocks do not add up to the RAM size: the saving QEMU had postcopy-ram with huge pages, or ignore-shared, turned on',
    );
  if ((await r.be64('the RAM setup end')) !== RamFlag.eos) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'the RAM setup does not end with EOS');
}

/**
 * One part of the RAM section: page and zero records until EOS, written into
 * the block images. `current`: the block the last record named (a record may
 * continue it, in this part or the next). Returns the records read.
 */
async function readRamPart(r: StreamReader, byName: Map<string, Block>, current: { block: Block | null }, tick: () => void): Promise<number> {
  let block = current.block;
  let records = 0;
  for (;;) {
    const head = await r.be64('a RAM record');
    const flags = head & 0xfff;
    const addr = head - flags;
    if (flags & RamFlag.eos) return records;
    for (const [bit, what] of UNSUPPORTED_FLAGS) if (flags & bit) throw new PostcopyError(ErrorCode.UNSUPPORTED, `the stream uses ${what}; save it without`);
    if (!(flags & RamFlag.continue)) {
      const name = await r.name('a RAM block name');
      block = byName.get(name) ?? null;
      if (!block) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `a page of RAM block "${name}", which the setup did not list`);
      current.block = block;
    }
    if (!block) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, 'a RAM record continues a block before any was named');
    if (addr >= block.length) throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `a page at ${addr} of RAM block "${block.name}" (${block.length} bytes)`);
    const page = addr / PAGE;
    const wasWritten = (block.written[page >> 3] >> (page & 7)) & 1;
    if (flags & RamFlag.zero) {
      const fill = await r.u8('a zero record');
      if (fill !== 0) {
        writeSync(block.fd, Buffer.alloc(PAGE, fill), 0, PAGE, addr);
        block.written[page >> 3] |= 1 << (page & 7);
        block.dataPages++;
      } else {
        if (wasWritten) {
          punchHole(block.fd, addr, PAGE); // a page that was written before is zero now: a hole again
          block.written[page >> 3] &= ~(1 << (page & 7));
        }
        block.zeroPages++;
      }
    } else if (flags & RamFlag.page) {
      const data = await r.bytes(PAGE, 'a RAM page');
      writeSync(block.fd, data, 0, PAGE, addr);
      block.written[page >> 3] |= 1 << (page & 7);
      block.dataPages++;
    } else {
      throw new PostcopyError(ErrorCode.QEMU_STREAM_INVALID, `a RAM record with flags 0x${flags.toString(16)}`);
    }
    records++;
    tick();
  }
}

/**
 * Where EOF is in the stream's last part (device sections, EOF, VM
 * description): the EOF byte followed by VMDESCRIPTION and a length that runs
 * exactly to the end. QEMU ends every saved state so; a stream without it
 * was cut short somewhere in its device state.
 */
function findEof(rest: Buffer): number {
  for (let i = rest.length - 6; i >= 0; i--) {
    if (rest[i] === Section.eof && rest[i + 1] === Section.vmDescription && rest.readUInt32BE(i + 2) === rest.length - i - 6) return i;
  }
  throw new PostcopyError(ErrorCode.QEMU_STREAM_TRUNCATED, 'the stream ends before its EOF and VM description: the device state is cut short');
}
