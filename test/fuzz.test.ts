// Fuzzing of our own, bounded and seeded (FUZZ_SEED to replay, FUZZ_CASES to
// scale up): malformed control frames against a source, hostile runs on the
// data channels against a fault engine, hostile welcomes against a
// destination, malformed VMM handshakes against the handler. Each case must
// end in a coded error (never a crash or a hang), and a legitimate session
// alongside must stay byte-exact.
import t from 'tap';
import { closeSync, writeSync } from 'node:fs';
import { once } from 'node:events';
import { join } from 'node:path';
import { connect as netConnect } from 'node:net';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination } from '../client/destination.js';
import { VmmHandler } from '../client/vmm-handler.js';
import { ErrorCode } from '../lib/errors.js';
import { Kind } from '../lib/wire.js';
import { FrameReader, encodeFrame, type Message } from '../lib/protocol.js';
import { sendFds } from '../lib/fd-passing.js';
import { Userfaultfd } from '../lib/uffd.js';
import { seededRandom } from './cut-points.js';
import { PAGE, buildFixture, fakeSource, fakeWelcome, randomImage, sentinelEngine, tempDir, writeImage } from './helpers.js';
import { spawn } from 'node:child_process';
import type { Test } from 'tap';

const seed = Number(process.env.FUZZ_SEED ?? 424242);
const scale = Number(process.env.FUZZ_CASES ?? 1);
const random = seededRandom(seed);
t.comment(`FUZZ_SEED=${seed} FUZZ_CASES=${scale}`);

const known = new Set<string>(Object.values(ErrorCode));
/** A code of our catalogue, or a kernel error's name. */
const isCoded = (code: unknown) => typeof code === 'string' && (known.has(code) || /^E[A-Z0-9]+$/.test(code));

const pick = <T>(xs: readonly T[]): T => xs[random(xs.length)];
function randomBytes(n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = random(256);
  return b;
}
/** A value of a random type, sometimes an edge case. */
function junk(depth = 0): unknown {
  switch (random(depth > 1 ? 8 : 10)) {
    case 0:
      return random(1 << 30);
    case 1:
      return -random(1000) - 1;
    case 2:
      return pick([0, 2 ** 53, 2 ** 64, Number.NaN, 1.5, 4096, 2 ** 40]);
    case 3:
      return randomBytes(random(40));
    case 4:
      return 'x'.repeat(random(50));
    case 5:
      return null;
    case 6:
      return pick([true, false]);
    case 7:
      return undefined;
    case 8:
      return Array.from({ length: random(4) }, () => junk(depth + 1));
    default:
      return Object.fromEntries(Array.from({ length: random(4) }, () => [pick(['t', 'id', 'length', 'pageSize', 'region', 'bitmap', 'x']), junk(depth + 1)]));
  }
}
/** A message with one field replaced by junk (or removed, or one added). */
function mutate(message: Record<string, unknown>): Record<string, unknown> {
  const m = { ...message };
  const keys = Object.keys(m).filter((k) => k !== 't' || random(8) === 0);
  const key = keys.length && random(5) ? pick(keys) : pick(['extra', 't']);
  if (random(6) === 0) delete m[key];
  else m[key] = junk();
  return m;
}

async function startSource(t: Test, bytes: Buffer): Promise<{ server: PageServer; path: string }> {
  const server = new PageServer({ image: Image.open([{ buffer: bytes }]), handshakeTimeoutMs: 1000 });
  const a = await server.listen(`unix:${join(tempDir(t), 'source.sock')}`);
  t.teardown(() => server.close());
  return { server, path: a.kind === 'unix' ? a.path : '' };
}

/** Sends `frames` on a new control connection and returns the error the source answers with (or null when it just closed). */
async function exchange(path: string, frames: Buffer[]): Promise<{ code: string | null }> {
  const socket = netConnect(path);
  socket.on('error', () => {});
  await once(socket, 'connect');
  const reader = new FrameReader(socket);
  for (const f of frames) socket.write(f);
  socket.end();
  const types = ['error', 'challenge', 'welcome', 'ready', 'started', 'attached', 'digest'] as const;
  for (;;) {
    try {
      const m = await reader.next(types, 5000);
      if (m.t === 'error') {
        socket.destroy();
        return { code: m.code };
      }
    } catch (err) {
      socket.destroy();
      const code = (err as { code?: string }).code ?? null;
      if (code === ErrorCode.TIMEOUT) throw new Error('the source neither answered nor closed: a hang');
      return { code: code === ErrorCode.PEER_GONE ? null : code };
    }
  }
}

t.test('control frames: random bytes, bad lengths, and valid handshakes with one field broken', async (t) => {
  const bytes = randomImage(64, 3);
  const { server, path } = await startSource(t, bytes);
  const hello = { t: 'hello', protocol: 1, software: 'fuzz', nonce: randomBytes(32) };
  const script: Record<string, unknown>[] = [
    hello,
    { t: 'auth' },
    { t: 'options', window: { forward: 2, backward: 1 }, background: { enabled: true, rateBytesPerSecond: 0 } },
    { t: 'have', region: 0, offset: 2, bitmap: Buffer.from([0xff, 0x0f]) },
    { t: 'start' },
    { t: 'done', stats: {}, verify: { regions: [{ id: 0, skip: [0, 4, 10, 2] }] } },
  ];
  const cases = 1500 * scale;
  const codes = new Map<string, number>();
  for (let i = 0; i < cases; i++) {
    let frames: Buffer[];
    switch (random(4)) {
      case 0: // noise
        frames = [randomBytes(1 + random(200))];
        break;
      case 1: {
        // a length prefix that lies
        const body = randomBytes(random(64));
        const head = Buffer.alloc(4);
        head.writeUInt32BE(pick([0, body.length + 1 + random(100), 0xffffffff, 64 << 20, random(1 << 20)]));
        frames = [head, body];
        break;
      }
      case 2: {
        // the script with one message broken, the rest in order
        const k = random(script.length);
        frames = script.map((m, j) => encodeFrame((j === k ? mutate(m) : m) as Message));
        break;
      }
      default: // an attach with junk
        frames = [encodeFrame(mutate({ t: 'attach', session: 'a'.repeat(32), channel: 'urgent', ticket: randomBytes(32) }) as Message)];
    }
    const { code } = await exchange(path, frames);
    if (code !== null && !isCoded(code)) t.fail(`case ${i}: an uncoded error ${code}`);
    codes.set(code ?? 'closed', (codes.get(code ?? 'closed') ?? 0) + 1);
  }
  t.comment(`${cases} cases: ${[...codes].map(([c, n]) => `${c} ${n}`).join(', ')}`);
  t.ok(codes.size > 2, 'the cases reached several different checks');
  const dest = await Destination.connect({ source: `unix:${path}` });
  t.teardown(() => dest.close());
  const report = await dest.finish();
  t.equal(report.digestMatch, true, 'a legitimate destination alongside is served byte-exact');
  t.ok(dest.regions[0].mapping.buffer().equals(bytes));
  await server.close();
});

t.test('data channels: a hostile source sends random runs; nothing outside the region is ever written', async (t) => {
  const pages = 16;
  let failures = 0;
  const engines = 300 * scale;
  for (let n = 0; n < engines; n++) {
    const e = sentinelEngine(pages);
    const stream = [];
    for (let r = 0; r < 1 + random(6); r++) {
      const h = Buffer.alloc(24);
      h.writeUInt32LE(pick([Kind.dataRun, Kind.zeroRun, Kind.bulkEnd, Kind.packedRun, random(2 ** 32)]), 0);
      h.writeUInt32LE(pick([0, 0, 1, random(2 ** 32)]), 4);
      h.writeBigUInt64LE(BigInt(pick([0, pages - 1, pages, random(pages), random(2 ** 31), 2 ** 40])), 8);
      h.writeUInt32LE(pick([1, 2, pages, 0, 513, random(2 ** 32)]), 16);
      h.writeUInt32LE(pick([0, 1, 2, random(2 ** 32)]), 20);
      const count = Math.min(h.readUInt32LE(16), pages + 1);
      stream.push(h, Buffer.alloc(h.readUInt32LE(0) === Kind.dataRun ? count * PAGE : 0, 0x11));
    }
    const bytes = Buffer.concat(stream);
    try {
      writeSync(random(2) ? e.bulk : e.urgent, bytes);
    } catch {
      // the engine already closed the channel
    }
    closeSync(e.bulk); // end of the hostile stream
    closeSync(e.urgent);
    const f = await e.failed;
    if (!isCoded(f.error.code)) t.fail(`engine ${n}: an uncoded error ${f.error.code}`);
    if (f.error.code !== ErrorCode.PEER_GONE) failures++;
    if (!e.finish().sentinels) t.fail(`engine ${n}: a sentinel page was written`);
  }
  t.ok(failures > 0, `${engines} hostile streams; ${failures} refused as malformed or out of range, the rest ended; no sentinel touched`);
});

t.test('hostile welcomes: a destination refuses each with a coded error', async (t) => {
  const good = fakeWelcome();
  let next: Record<string, unknown> = good;
  const source = await fakeSource(t, () => next);
  const cases = 500 * scale;
  const codes = new Map<string, number>();
  for (let i = 0; i < cases; i++) {
    next = mutate(good);
    if (random(3) === 0) next.regions = [mutate((good.regions as Record<string, unknown>[])[0])];
    try {
      const dest = await Destination.connect({ source, recovery: { connectTimeoutMs: 300 } });
      dest.close();
      t.fail(`case ${i}: a hostile welcome was taken`);
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (!isCoded(code)) t.fail(`case ${i}: an uncoded error ${String(code)}: ${(err as Error).message}`);
      codes.set(String(code), (codes.get(String(code)) ?? 0) + 1);
    }
  }
  t.comment(`${cases} welcomes: ${[...codes].map(([c, n]) => `${c} ${n}`).join(', ')}`);
  t.pass('every hostile welcome was refused with a code');
});

t.test('malformed VMM handshakes: each is refused with a coded reason; a real VMM is served afterwards', async (t) => {
  const dir = tempDir(t);
  const image = randomImage(256, 4);
  const imagePath = writeImage(dir, image);
  const { path } = await startSource(t, Buffer.from(image));
  const handler = new VmmHandler({ source: `unix:${path}`, handshakeTimeoutMs: 2000 });
  const socketPath = join(dir, 'handler.sock');
  await handler.listen(socketPath);
  t.teardown(() => handler.close());
  const rejected: string[] = [];
  handler.on('rejected', (r: { code: string }) => rejected.push(r.code));
  const uffd = Userfaultfd.open();
  t.teardown(() => uffd.close());
  const region = () => ({
    base_host_virt_addr: 0x7f0000000000 + random(16) * PAGE,
    size: pick([PAGE, 16 * PAGE, 0, -1, 2 ** 50]),
    offset: pick([0, PAGE, 300 * PAGE, -PAGE]),
    page_size: pick([PAGE, 1000, 2 ** 21, undefined]),
  });
  const cases = 300 * scale;
  for (let i = 0; i < cases; i++) {
    let payload: Buffer;
    switch (random(4)) {
      case 0:
        payload = randomBytes(1 + random(100));
        break;
      case 1:
        payload = Buffer.from(JSON.stringify(junk()) ?? 'null');
        break;
      case 2:
        payload = Buffer.from(JSON.stringify([mutate(region())]));
        break;
      default:
        payload = Buffer.from(JSON.stringify(Array.from({ length: random(4) }, region)));
    }
    if (payload.length === 0) payload = Buffer.from('[]');
    const socket = netConnect(socketPath);
    socket.on('error', () => {});
    await once(socket, 'connect');
    const fd = (socket as unknown as { _handle: { fd: number } })._handle.fd;
    sendFds(fd, payload, random(5) ? [uffd.fd] : []);
    socket.resume();
    // A handshake that happens to fit is served until we hang up; the rest are closed by the handler.
    await Promise.race([once(socket, 'close'), new Promise((r) => setTimeout(r, 200))]);
    socket.destroy();
  }
  t.ok(rejected.length > 0 && rejected.every(isCoded), `${rejected.length} of ${cases} refused, each with a code`);
  const vmm = spawn(buildFixture('vmm'), ['--socket', socketPath, '--image', imagePath, '--threads', '2'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const [code] = await once(vmm, 'close');
  t.equal(code, 0, 'a real VMM is served byte-exact afterwards');
});
