// Packed runs (docs/PROTOCOL.md, "Packed runs"): across a link the source
// sends bulk runs compressed with zstd while the link is slower than packing,
// and a destination unpacks each one whole before any page of it is
// installed. Over a veth pair shaped to 1 Gbit/s (made and removed here) a
// real restore packs and stays byte-exact; a destination that refuses packed
// runs, and loopback, get none; hostile packed runs end the channel with a
// coded error and install nothing.
import t from 'tap';
import { closeSync, existsSync, mkdtempSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { startSource } from '../bench/source.js';
import { Destination } from '../client/destination.js';
import type { ChannelFailure } from '../client/fault-engine.js';
import { ErrorCode } from '../lib/errors.js';
import { native } from '../lib/native.js';
import { Kind, Reason, encodeRunHeader } from '../lib/wire.js';
import { PAGE, gigabitLink, sentinelEngine } from './helpers.js';

const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'packed-runs-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));

/** 2048 pages: a quarter zero, a quarter random, half text-like (words and numbers), in stretches. */
function mixedImage(): string {
  const pages = 2048;
  const image = Buffer.alloc(pages * PAGE);
  const words = ['page', 'fault', 'memory', 'source', 'restore', 'kernel', 'thread', 'region', '0x7f3a', 'ok', 'error', 'true'];
  for (let p = 0; p < pages; p++) {
    const kind = Math.floor(p / 64) % 4; // stretches of 64 pages: zero, random, text, text
    const page = image.subarray(p * PAGE, (p + 1) * PAGE);
    if (kind === 1) randomBytes(PAGE).copy(page);
    else if (kind >= 2) {
      let text = '';
      for (let k = 0; text.length < PAGE; k++) text += `${words[(p * 31 + k * 7) % words.length]} ${(p * k) % 1000} `;
      page.write(text.slice(0, PAGE), 'latin1');
    }
  }
  const path = join(dir, 'mixed.img');
  writeFileSync(path, image);
  return path;
}
const image = mixedImage();

async function restore(address: string, token: string | undefined, refusePackedRuns = false) {
  const dest = await Destination.connect({ source: address, token, refusePackedRuns, background: { enabled: true, rateBytesPerSecond: 0 } });
  try {
    const report = await dest.finish();
    return { report, source: report.source as unknown as Record<string, number>, stats: dest.stats() };
  } finally {
    dest.close();
  }
}

t.test(
  'across a 1 Gbit/s link the bulk runs go packed, fewer bytes cross it, and the memory is byte-exact',
  { skip: !native.packingAvailable() && 'libzstd.so.1 is not here' },
  async (t) => {
    const up = await gigabitLink(t, image, dir);
    if (!up) return;
    const packed = await restore(up.source.address, up.token);
    t.equal(packed.report.digestMatch, true, 'byte for byte');
    t.ok(packed.source.packedRuns > 0, `${packed.source.packedRuns} runs went packed`);
    t.ok(
      packed.source.packedWireBytes < packed.source.packedRawBytes / 2,
      `their ${packed.source.packedRawBytes} bytes took ${packed.source.packedWireBytes} on the wire`,
    );
    t.equal(packed.stats.packedRuns, packed.source.packedRuns, 'the destination unpacked every one');
    const plain = await restore(up.source.address, up.token, true);
    t.equal(plain.report.digestMatch, true, 'refusing packed runs: byte for byte too');
    t.equal(plain.source.packedRuns, 0, 'and none came packed');
    t.ok(packed.stats.bytesReceived < plain.stats.bytesReceived, `bytes received: ${packed.stats.bytesReceived} packed, ${plain.stats.bytesReceived} not`);
  },
);

t.test('over loopback TCP and a unix socket no run is packed', async (t) => {
  for (const address of ['tcp:127.0.0.1:0', `unix:${join(dir, 'plain.sock')}`]) {
    const source = await startSource(image, address);
    t.teardown(() => source.close());
    const { report, source: stats } = await restore(source.address, source.token);
    t.equal(report.digestMatch, true, `${address}: byte for byte`);
    t.equal(stats.packedRuns, 0, `${address}: nothing packed`);
  }
});

/**
 * A zstd frame written by hand (RFC 8878): single segment, a 2-byte content
 * size, and one RLE block of `size` copies of `byte` (so this test needs no
 * compressor of its own). `declared` is the content size the header claims.
 */
function rleFrame(byte: number, size: number, declared = size): Buffer {
  const header = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x60, 0, 0]);
  header.writeUInt16LE(declared - 256, 5);
  const block = Buffer.alloc(4);
  block.writeUIntLE(1 | (1 << 1) | (size << 3), 0, 3); // last block, RLE, size
  block[3] = byte;
  return Buffer.concat([header, block]);
}

function packedRun(page: number, count: number, frame: Buffer, length = frame.length): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32LE(length >>> 0, 0);
  return Buffer.concat([encodeRunHeader(Kind.packedRun, 0, page, count, Reason.background), len, frame]);
}

/** What `bytes` on the bulk channel of a fault engine over 4 pages between two sentinels do. */
async function feed(bytes: Buffer): Promise<{ failure: ChannelFailure | null; pages: Buffer; sentinels: boolean; packedRuns: number }> {
  const e = sentinelEngine(4);
  try {
    writeSync(e.bulk, bytes);
  } catch {
    // the engine already closed the channel
  }
  closeSync(e.bulk); // the end of the stream: the bulk channel fails or ends first
  const failure = await e.failed;
  closeSync(e.urgent);
  const packedRuns = e.engine.stats().packedRuns;
  const { pages, sentinels } = e.finish();
  return { failure: failure.error.code === ErrorCode.PEER_GONE ? null : failure, pages, sentinels, packedRuns };
}

t.test(
  'a packed run unpacks to its pages before they are installed; a hostile one ends the channel and installs nothing',
  { skip: !native.packingAvailable() && 'libzstd.so.1 is not here' },
  async (t) => {
    const good = await feed(packedRun(1, 2, rleFrame(0xab, 2 * PAGE)));
    t.equal(good.failure, null, 'a well-formed packed run: the channel ends only when the source closes it');
    t.equal(good.packedRuns, 1);
    t.ok(
      good.pages.subarray(PAGE, 3 * PAGE).every((b) => b === 0xab),
      'pages 1 and 2 hold what the run unpacked to',
    );
    t.ok(
      good.pages.subarray(0, PAGE).every((b) => b === 0),
      'page 0 was not in the run',
    );

    const cases: [string, Buffer, string][] = [
      ['a frame that unpacks to fewer bytes than its pages', packedRun(0, 2, rleFrame(0xcd, PAGE)), ErrorCode.PROTOCOL_MALFORMED],
      ['a frame that unpacks to more bytes than its pages', packedRun(0, 1, rleFrame(0xcd, 2 * PAGE)), ErrorCode.PROTOCOL_MALFORMED],
      ['a frame that lies about its size', packedRun(0, 2, rleFrame(0xcd, 2 * PAGE, PAGE)), ErrorCode.PROTOCOL_MALFORMED],
      ['bytes that are no zstd frame', packedRun(0, 1, randomBytes(64)), ErrorCode.PROTOCOL_MALFORMED],
      ['a length of zero', packedRun(0, 1, Buffer.alloc(0)), ErrorCode.PROTOCOL_OUT_OF_RANGE],
      ['a length beyond what the pages can pack to', packedRun(0, 1, rleFrame(0xcd, PAGE), 1 << 30), ErrorCode.PROTOCOL_OUT_OF_RANGE],
      ['a run outside the region', packedRun(4, 1, rleFrame(0xcd, PAGE)), ErrorCode.PROTOCOL_OUT_OF_RANGE],
    ];
    for (const [name, bytes, code] of cases) {
      const r = await feed(bytes);
      t.equal(r.failure?.error.code, code, `${name}: ${code}`);
      t.ok(
        r.pages.every((b) => b === 0),
        `${name}: no page installed`,
      );
      t.ok(r.sentinels, `${name}: nothing outside the region written`);
    }
  },
);
