import t from 'tap';
import { closeSync, fstatSync, readFileSync, readdirSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { connect as netConnect, createServer, Socket as NetSocket } from 'node:net';
import { join } from 'node:path';
import { once } from 'node:events';
import { Image } from '../lib/image.js';
import { MAX_UNPROVEN_CONNECTIONS, PageServer } from '../server/page-server.js';
import { Destination } from '../client/destination.js';
import { SourceConnection } from '../client/source-connection.js';
import { type ChannelFailure, type MemoryEvent, FaultEngine } from '../client/fault-engine.js';
import { DEFAULT_TRANSFER } from '../client/destination.js';
import { FrameReader, MAX_PREFETCH_ENTRIES, checkDigest, checkHaveChunk, checkPageSizes, checkPrefetch, checkVerify, encodeFrame } from '../lib/protocol.js';
import { pageChecksum } from '../lib/digest.js';
import { compareInstalled } from '../client/installed-checksum.js';
import { native } from '../lib/native.js';
import { parseAddress } from '../lib/address.js';
import { socketPair } from '../lib/fd-passing.js';
import { madvise, mapAnonymous } from '../lib/memory.js';
import { ErrorCode } from '../lib/errors.js';
import { Kind, PAGE_REQUEST_BYTES, RUN_HEADER_BYTES, Reason, encodePageRequest, encodeRunHeader } from '../lib/wire.js';
import { Userfaultfd } from '../lib/uffd.js';
import { PAGE, fakeServingSource, fakeSource, fakeWelcome, here, randomImage, tempDir, until } from './helpers.js';
import type { Test } from 'tap';

async function startServer(t: Test, options: { token?: string } = {}) {
  const image = Image.open([{ buffer: randomImage(64) }]);
  const server = new PageServer({ image, token: options.token });
  t.teardown(() => server.close());
  const path = join(tempDir(t), 'source.sock');
  await server.listen(`unix:${path}`);
  return { server, path, source: `unix:${path}` };
}

/** Sends raw bytes on a fresh connection and returns the first frame the server answers with. */
async function rawExchange(path: string, bytes: Buffer) {
  const socket = netConnect(path);
  await new Promise((r) => socket.once('connect', r));
  const reader = new FrameReader(socket);
  socket.write(bytes);
  try {
    return await reader.next(['error'], 5000);
  } finally {
    socket.destroy();
  }
}

t.test('the unix socket is created 0600', async (t) => {
  const { path } = await startServer(t);
  t.equal(statSync(path).mode & 0o777, 0o600);
});

t.test('a token is proven both ways and never sent', async (t) => {
  const { source } = await startServer(t, { token: 'correct horse' });
  const dest = await Destination.connect({ source, token: 'correct horse' });
  t.teardown(() => dest.close());
  t.equal((await dest.finish()).digestMatch, true);
});

t.test('a wrong token is refused with a clear error', async (t) => {
  const { source, server } = await startServer(t, { token: 'correct horse' });
  // The destination checks the source's proof first: a wrong token cannot verify it.
  await t.rejects(Destination.connect({ source, token: 'battery staple' }), {
    code: 'ERR_AUTH_FAILED',
    message: /the tokens differ: the source at .* holds another token than this destination's/,
  });
  await t.rejects(Destination.connect({ source }), { code: 'ERR_AUTH_REQUIRED' });
  t.equal(server.sessions.size, 0, 'no session was created');
});

t.test('a destination holding a token refuses a source that does not prove it, whatever its auth says', async (t) => {
  // An impostor that asks for no authentication must not supply the memory.
  const { source } = await startServer(t);
  await t.rejects(Destination.connect({ source, token: 'correct horse' }), { code: 'ERR_AUTH_FAILED', message: /did not prove/ });
  // One that names an authentication nobody knows is a protocol error, token or not.
  const dir = tempDir(t);
  const fake = createServer((socket) => {
    const reader = new FrameReader(socket);
    void reader.next(['hello'], 5000).then(
      () => socket.write(encodeFrame({ t: 'challenge', protocol: 1, software: 'fake', nonce: Buffer.alloc(32, 7), auth: 'weird' as 'none' })),
      () => {},
    );
  });
  const path = join(dir, 'fake.sock');
  await new Promise<void>((resolve) => fake.listen(path, resolve));
  t.teardown(() => fake.close());
  for (const token of ['correct horse', undefined]) {
    await t.rejects(Destination.connect({ source: `unix:${path}`, token }), { code: 'ERR_PROTOCOL_MALFORMED', message: /unknown authentication/ });
  }
});

t.test('a destination that fakes its proof is refused by the source', async (t) => {
  const { path } = await startServer(t, { token: 'secret' });
  const socket = netConnect(path);
  t.teardown(() => socket.destroy());
  await new Promise((r) => socket.once('connect', r));
  const reader = new FrameReader(socket);
  socket.write(encodeFrame({ t: 'hello', protocol: 1, software: 'test', nonce: Buffer.alloc(32, 1) }));
  await reader.next(['challenge'], 5000);
  socket.write(encodeFrame({ t: 'auth', proof: Buffer.alloc(32, 2) }));
  const err = await reader.next(['error'], 5000);
  t.equal(err.code, 'ERR_AUTH_FAILED');
});

t.test('nothing listens on TCP without a token, loopback included', async (t) => {
  // On the old main a tokenless TCP source on loopback gave the image to any user of the host.
  const server = new PageServer({ image: Image.open([{ buffer: randomImage(1) }]) });
  await t.rejects(server.listen('tcp:0.0.0.0:0'), { code: 'ERR_AUTH_REQUIRED', message: /anyone on the network/ });
  await t.rejects(server.listen('tcp:127.0.0.1:0'), { code: 'ERR_AUTH_REQUIRED', message: /any user of this host/ });
  t.throws(() => parseAddress('http://example'), { code: 'ERR_INVALID_ADDRESS' });
});

t.test('an oversized control frame is refused and the connection closed', async (t) => {
  const { path, server } = await startServer(t);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(64 << 20);
  const err = await rawExchange(path, header);
  t.equal(err.code, 'ERR_PROTOCOL_FRAME_TOO_LARGE');
  t.equal(server.sessions.size, 0);
});

t.test('a malformed frame is refused with ERR_PROTOCOL_MALFORMED', async (t) => {
  const { path } = await startServer(t);
  const garbage = Buffer.concat([Buffer.from([0, 0, 0, 3]), Buffer.from([0xc1, 0xc1, 0xc1])]);
  t.equal((await rawExchange(path, garbage)).code, 'ERR_PROTOCOL_MALFORMED');
  t.equal((await rawExchange(path, encodeFrame({ t: 'done' }))).code, 'ERR_PROTOCOL_MALFORMED', 'a message out of turn');
  t.equal((await rawExchange(path, encodeFrame({ t: 'hello', protocol: 99, software: 'x', nonce: Buffer.alloc(32) }))).code, 'ERR_PROTOCOL_VERSION');
});

t.test('a data channel with a wrong ticket is refused', async (t) => {
  const { path } = await startServer(t);
  const err = await rawExchange(path, encodeFrame({ t: 'attach', session: 'nope', channel: 'urgent', ticket: Buffer.alloc(32) }));
  t.equal(err.code, 'ERR_AUTH_FAILED');
});

t.test('a destination asking for a page outside the image loses its session; others go on', async (t) => {
  const { source, server } = await startServer(t);
  const rogue = await SourceConnection.open({ source, transfer: { ...DEFAULT_TRANSFER, background: { enabled: false, rateBytesPerSecond: 0 } } });
  const { urgentFd, bulkFd } = rogue.takeChannels();
  t.teardown(() => {
    rogue.close();
    closeSync(urgentFd);
    closeSync(bulkFd);
  });
  await rogue.start();
  const request = Buffer.alloc(16);
  request.writeUInt32LE(0x51455250, 0); // PREQ
  request.writeUInt32LE(0, 4);
  request.writeBigUInt64LE(1n << 40n, 8);
  writeSync(urgentFd, request);
  const failure = await rogue.failure();
  t.equal(failure.code, 'ERR_PROTOCOL_OUT_OF_RANGE');
  // A session that broke the protocol is not kept for a resume.
  await until('the failed session to leave the source', () => !server.sessions.has(rogue.session));
  t.pass('the failed session is gone from the source');
  const honest = await Destination.connect({ source });
  t.teardown(() => honest.close());
  t.equal((await honest.finish()).digestMatch, true, 'the server still serves others');
  t.ok(server.sessions.size >= 1);
});

t.test('a source sending runs outside the region is cut off; nothing outside the region is written', async (t) => {
  const pages = 8;
  const whole = mapAnonymous((pages + 2) * PAGE); // sentinel page, region, sentinel page
  t.teardown(() => whole.unmap());
  whole.buffer(0, PAGE).fill(0xee);
  whole.buffer((pages + 1) * PAGE, PAGE).fill(0xee);
  const uffd = Userfaultfd.open();
  t.teardown(() => uffd.close());
  uffd.handshake();
  const base = whole.address + PAGE;
  uffd.register(base, pages * PAGE);
  const [bulkOurs, bulkTheirs] = socketPair();
  const [urgentOurs, urgentTheirs] = socketPair();
  t.teardown(() => {
    closeSync(bulkOurs);
    closeSync(urgentOurs);
  });
  const engine = new FaultEngine({ uffd: uffd.fd, regions: [{ base, length: pages * PAGE, pageSize: PAGE }] });
  t.teardown(() => engine.stop());
  const failures: { code: string; message: string }[] = [];
  engine.on('channel-failed', (f: ChannelFailure) => failures.push(f.error));
  engine.start();
  engine.attachChannels({ urgentFd: urgentTheirs, bulkFd: bulkTheirs });
  const run = (first: bigint, count: number, fill: number, region = 0) => {
    const h = Buffer.alloc(24);
    h.writeUInt32LE(0x41544144, 0); // DATA
    h.writeUInt32LE(region, 4);
    h.writeBigUInt64LE(first, 8);
    h.writeUInt32LE(count, 16);
    h.writeUInt32LE(2, 20);
    return Buffer.concat([h, Buffer.alloc(PAGE * Math.min(count, 2), fill)]);
  };
  writeSync(bulkOurs, run(0n, 1, 0x11)); // fine
  writeSync(bulkOurs, run(BigInt(pages), 1, 0x22)); // one page past the end: the sentinel
  writeSync(urgentOurs, run(BigInt(pages - 1), 2, 0x33)); // straddles the end
  await until('two failures', () => failures.length >= 2);
  t.same(
    failures.map((f) => f.code),
    ['ERR_PROTOCOL_OUT_OF_RANGE', 'ERR_PROTOCOL_OUT_OF_RANGE'],
  );
  t.ok(
    whole.buffer(0, PAGE).every((b) => b === 0xee),
    'the sentinel before the region is untouched',
  );
  t.ok(
    whole.buffer((pages + 1) * PAGE, PAGE).every((b) => b === 0xee),
    'the sentinel after the region is untouched',
  );
  t.equal(engine.stats().residentPages, 1, 'the valid run was installed');
  t.ok(whole.buffer(PAGE, PAGE).every((b) => b === 0x11));
  t.equal(engine.complete, false, 'a failed channel leaves the engine waiting for new channels, not failed');
});

t.test('engine arguments are validated before they reach native code', async (t) => {
  const attempt = (options: Partial<ConstructorParameters<typeof FaultEngine>[0]>) => {
    let error: unknown;
    try {
      new FaultEngine({ uffd: 0, regions: [], ...options });
    } catch (err) {
      error = err;
    }
    return error;
  };
  const region = (base: number, pageSize = PAGE) => ({ base, length: 2 * pageSize, pageSize });
  t.match(attempt({ uffd: -1 }), { code: 'ERR_OUT_OF_RANGE' });
  t.match(attempt({ regions: [] }), { code: 'ERR_OUT_OF_RANGE' });
  t.match(attempt({ regions: [region(PAGE), region(2 * PAGE)] }), { code: 'ERR_OUT_OF_RANGE', message: /overlap/ });
  t.match(attempt({ regions: [region(PAGE + 1)] }), { code: 'ERR_OUT_OF_RANGE' });
  t.match(attempt({ regions: [region(1 << 30, 1 << 30)] }), { code: 'ERR_OUT_OF_RANGE' }, 'pages larger than one run are refused');
  t.match(
    attempt({ regions: [region(PAGE)], sourceRegions: [{ pages: 4, pageSize: 1 << 30 }] }),
    { code: 'ERR_OUT_OF_RANGE' },
    'so are source pages larger than one run',
  );
});

t.test('pages already present when the engine starts still count toward completion', async (t) => {
  const pages = 4;
  const region = mapAnonymous(pages * PAGE);
  t.teardown(() => region.unmap());
  region.buffer(PAGE, PAGE).fill(0x5a); // the process touched page 1 before handing its memory over
  const uffd = Userfaultfd.open();
  t.teardown(() => uffd.close());
  uffd.handshake();
  uffd.register(region.address, region.length);
  const [bulkOurs, bulkTheirs] = socketPair();
  const [urgentOurs, urgentTheirs] = socketPair();
  t.teardown(() => {
    closeSync(bulkOurs);
    closeSync(urgentOurs);
  });
  const engine = new FaultEngine({ uffd: uffd.fd, regions: [{ base: region.address, length: region.length, pageSize: PAGE }] });
  t.teardown(() => engine.stop());
  engine.start();
  engine.attachChannels({ urgentFd: urgentTheirs, bulkFd: bulkTheirs });
  const h = Buffer.alloc(24);
  h.writeUInt32LE(0x41544144, 0); // DATA, region 0, pages 0..3, background
  h.writeBigUInt64LE(0n, 8);
  h.writeUInt32LE(pages, 16);
  h.writeUInt32LE(2, 20);
  writeSync(bulkOurs, Buffer.concat([h, Buffer.alloc(pages * PAGE, 0x11)]));
  await engine.whenResident();
  t.equal(engine.stats().residentPages, pages);
  t.ok(
    region.buffer(PAGE, PAGE).every((b) => b === 0x5a),
    'the page the process wrote kept its bytes',
  );
  t.ok(region.buffer(0, PAGE).every((b) => b === 0x11));
});

t.test('an engine cannot be restarted after stop(); channels offered then are refused and closed', async (t) => {
  const region = mapAnonymous(PAGE);
  const uffd = Userfaultfd.open();
  t.teardown(() => {
    uffd.close();
    region.unmap();
  });
  uffd.handshake();
  uffd.register(region.address, PAGE);
  const [a, b] = socketPair();
  const [c, d] = socketPair();
  t.teardown(() => {
    closeSync(a);
    closeSync(c);
  });
  const engine = new FaultEngine({ uffd: uffd.fd, regions: [{ base: region.address, length: PAGE, pageSize: PAGE }] });
  engine.start();
  engine.stop();
  engine.start(); // a no-op, not a crash
  await t.rejects(engine.whenResident(), { code: 'ERR_PEER_GONE' });
  t.throws(() => engine.attachChannels({ urgentFd: b, bulkFd: d }), { code: 'ERR_ENGINE_STATE' });
  t.throws(() => fstatSync(b), { code: 'EBADF' }, 'the urgent channel was closed');
  t.throws(() => fstatSync(d), { code: 'EBADF' }, 'the bulk channel was closed');
});

t.test('a frame dribbled in small pieces is joined once, not once per piece', async (t) => {
  // Four clients each dribbling a 4 MiB frame in 1 KiB writes used to cost a
  // copy of everything buffered so far on every write (quadratic).
  const frame = encodeFrame({ t: 'error', code: 'ERR_TIMEOUT', message: 'x'.repeat(4 << 20) });
  const [ours, theirs] = socketPair();
  const input = new NetSocket({ fd: theirs, readable: true, writable: true });
  t.teardown(() => {
    input.destroy();
    closeSync(ours);
  });
  const reader = new FrameReader(input, 8 << 20);
  const concat = Buffer.concat;
  let copied = 0;
  Buffer.concat = ((list: readonly Uint8Array[], length?: number) => {
    const out = concat(list, length);
    copied += out.length;
    return out;
  }) as typeof Buffer.concat;
  t.teardown(() => {
    Buffer.concat = concat;
  });
  const got = reader.next(['error'], 30_000);
  for (let off = 0; off < frame.length; off += 1024) {
    input.emit('data', frame.subarray(off, off + 1024)); // as the socket would deliver it
  }
  const message = await got;
  Buffer.concat = concat;
  t.equal(message.message.length, 4 << 20);
  t.ok(copied <= 2 * frame.length, `bytes copied while joining (${copied}) stay within twice the frame (${frame.length})`);
});

t.test('every code native code can raise is in the catalogue of lib/errors.ts', async (t) => {
  const addon = join(here, '..', 'addon');
  const raised = new Set<string>();
  for (const file of readdirSync(addon)) {
    for (const m of readFileSync(join(addon, file), 'utf8').matchAll(/"(ERR_[A-Z_]+)"/g)) raised.add(m[1]);
  }
  t.ok(raised.size >= 5, `found the codes native code raises (${[...raised].join(', ')})`);
  const known = new Set<string>(Object.values(ErrorCode));
  t.same(
    [...raised].filter((c) => !known.has(c)),
    [],
    'none is missing from ErrorCode',
  );
});

t.test('memory events reach JS with named fields', async (t) => {
  const region = mapAnonymous(8 * PAGE);
  const uffd = Userfaultfd.open();
  t.teardown(() => {
    uffd.close();
    region.unmap();
  });
  uffd.handshake(['EVENT_REMOVE']);
  uffd.register(region.address, region.length);
  const engine = new FaultEngine({ uffd: uffd.fd, regions: [{ base: region.address, length: region.length, pageSize: PAGE }] });
  t.teardown(() => engine.stop());
  const seen = new Promise<MemoryEvent>((resolve) => engine.once('memory-event', resolve));
  engine.start();
  madvise(region, 2 * PAGE, 3 * PAGE, 'dontneed');
  t.same(await seen, { type: 'remove', start: region.address + 2 * PAGE, end: region.address + 5 * PAGE });
  t.equal(engine.stats().removedPages, 3);
});

t.test('a source claiming a huge image is refused before anything is allocated for it', async (t) => {
  // On the old main a 1 TiB welcome made the destination allocate 3.2 GiB and block for seconds.
  const huge = await fakeSource(t, () => fakeWelcome({ regions: [{ id: 0, name: 'huge', length: 2 ** 40, pageSize: PAGE }] }));
  await t.rejects(Destination.connect({ source: huge }), { code: 'ERR_PROTOCOL_OUT_OF_RANGE', message: /accepts at most/ });
  const many = await fakeSource(t, () =>
    fakeWelcome({ regions: Array.from({ length: 300 }, (_, id) => ({ id, name: `r${id}`, length: PAGE, pageSize: PAGE })) }),
  );
  await t.rejects(Destination.connect({ source: many }), { code: 'ERR_PROTOCOL_OUT_OF_RANGE', message: /regions/ });
  const before = process.memoryUsage().rss;
  const big = await fakeSource(t, () => fakeWelcome({ regions: [{ id: 0, name: 'big', length: 2 ** 36, pageSize: PAGE }] }));
  await t.rejects(Destination.connect({ source: big, maxImageBytes: 2 ** 35 }), { code: 'ERR_PROTOCOL_OUT_OF_RANGE' });
  t.ok(process.memoryUsage().rss - before < 64 << 20, 'and nothing large was allocated');
});

t.test('per-page bookkeeping costs memory only for pages in use', async (t) => {
  // 64 GiB of guest memory: on the old main the engine allocated 12 bytes per page (768 MiB) up front.
  const length = 2 ** 36;
  const region = mapAnonymous(length, { noReserve: true });
  const uffd = Userfaultfd.open();
  t.teardown(() => {
    uffd.close();
    region.unmap();
  });
  uffd.handshake();
  uffd.register(region.address, length);
  const before = process.memoryUsage().rss;
  const engine = new FaultEngine({ uffd: uffd.fd, regions: [{ base: region.address, length, pageSize: PAGE }] });
  t.teardown(() => engine.stop());
  engine.start();
  const grew = process.memoryUsage().rss - before;
  t.ok(grew < 128 << 20, `the engine over 64 GiB added ${Math.round(grew / 2 ** 20)} MiB (bitmaps only)`);
});

t.test('the TypeScript twin of the data-channel layouts agrees with addon/wire.h', async (t) => {
  const header = readFileSync(join(here, '..', 'addon', 'wire.h'), 'utf8');
  const constants = new Map([...header.matchAll(/constexpr uint32_t (\w+) = (0x[0-9a-f]+);/gi)].map((m) => [m[1], Number(m[2])]));
  const constant = (name: string) => constants.get(name);
  t.equal(constant('kRequest'), Kind.request);
  t.equal(constant('kDataRun'), Kind.dataRun);
  t.equal(constant('kZeroRun'), Kind.zeroRun);
  t.equal(constant('kBulkEnd'), Kind.bulkEnd);
  t.equal(constant('kDiscardRun'), Kind.discardRun);
  t.equal(constant('kSwitchover'), Kind.switchover);
  t.match(header, new RegExp(`sizeof\\(PageRequest\\) == ${PAGE_REQUEST_BYTES}\\)`));
  t.match(header, new RegExp(`sizeof\\(RunHeader\\) == ${RUN_HEADER_BYTES}\\)`));
  t.match(header, /kRequested = 0, kWindow = 1, kBackground = 2, kPrefetch = 3, kPrecopy = 4/);
  t.same(Reason, { requested: 0, window: 1, background: 2, prefetch: 3, precopy: 4 });
  t.equal(encodeRunHeader(Kind.dataRun, 1, 2, 3, Reason.background).toString('hex'), '444154410100000002000000000000000300000002000000');
  t.equal(encodePageRequest(1, 5).toString('hex'), '5052455101000000' + '0500000000000000');
});

t.test('a verify request is checked before the source hashes anything for it', async (t) => {
  const regions = [
    { length: 64 * PAGE, pageSize: PAGE },
    { length: 8 * PAGE, pageSize: PAGE },
  ];
  t.same(checkVerify({ regions: [{ id: 1, skip: [0, 2, 5, 3] }] }, regions), [
    {
      id: 1,
      skip: [
        [0, 2],
        [5, 3],
      ],
    },
  ]);
  t.equal(checkVerify(undefined, regions), undefined, 'an older destination asks for nothing');
  for (const [what, verify, code] of [
    ['not a list', { regions: 7 }, 'ERR_PROTOCOL_MALFORMED'],
    ['an unknown region', { regions: [{ id: 2, skip: [] }] }, 'ERR_PROTOCOL_OUT_OF_RANGE'],
    [
      'a region named twice',
      {
        regions: [
          { id: 0, skip: [] },
          { id: 0, skip: [] },
        ],
      },
      'ERR_PROTOCOL_OUT_OF_RANGE',
    ],
    ['an odd list', { regions: [{ id: 0, skip: [1] }] }, 'ERR_PROTOCOL_OUT_OF_RANGE'],
    ['ranges out of order', { regions: [{ id: 0, skip: [10, 1, 5, 1] }] }, 'ERR_PROTOCOL_OUT_OF_RANGE'],
    ['overlapping ranges', { regions: [{ id: 0, skip: [10, 4, 12, 1] }] }, 'ERR_PROTOCOL_OUT_OF_RANGE'],
    ['a range past the end', { regions: [{ id: 1, skip: [6, 3] }] }, 'ERR_PROTOCOL_OUT_OF_RANGE'],
    ['an empty range', { regions: [{ id: 1, skip: [6, 0] }] }, 'ERR_PROTOCOL_OUT_OF_RANGE'],
    ['a fractional page', { regions: [{ id: 1, skip: [0.5, 1] }] }, 'ERR_PROTOCOL_OUT_OF_RANGE'],
  ] as const) {
    t.throws(() => checkVerify(verify, regions), { code }, what);
  }
});

t.test('a digest whose checksums are malformed is refused with a code', async (t) => {
  const good = { t: 'digest' as const, regions: [{ id: 0, sha256: 'ab' }], stats: {} };
  t.ok(checkDigest({ ...good, checksums: [{ id: 0, sum: '00112233445566ff', pages: 3 }] }));
  for (const checksums of [[{ id: 0, sum: 'xyz', pages: 3 }], [{ id: 0, sum: '00112233445566ff' }], 'no'] as unknown[]) {
    t.throws(() => checkDigest({ ...good, checksums } as never), { code: 'ERR_PROTOCOL_MALFORMED' });
  }
});

t.test('the source side of the installed-pages checksum: whole region less the pages left out', async (t) => {
  const bytes = randomImage(64, 5);
  const whole = await pageChecksum(bytes, PAGE, 0, [[0, 64]]);
  const parts = (await pageChecksum(bytes, PAGE, 0, [[0, 10]])) + (await pageChecksum(bytes, PAGE, 0, [[10, 54]]));
  t.equal(whole, parts & ((1n << 64n) - 1n), 'a sum over ranges adds up');
  t.not(await pageChecksum(bytes, PAGE, 1, [[0, 64]]), whole, 'the same pages in another region sum differently');
  const moved = Buffer.from(bytes);
  bytes.copy(moved, 0, PAGE, 2 * PAGE);
  bytes.copy(moved, PAGE, 0, PAGE);
  t.not(await pageChecksum(moved, PAGE, 0, [[0, 64]]), whole, 'two pages swapped change the sum');
  t.throws(() => native.pageChecksum(bytes, PAGE, 0, 60, 5), { code: 'ERR_OUT_OF_RANGE' }, 'native code refuses pages past the buffer');
  await t.rejects(pageChecksum(bytes, PAGE, 0, [[60, 5]]), { code: 'ERR_OUT_OF_RANGE' }, 'and TypeScript refuses them first');
});

t.test('a probe proves the tokens both ways and starts no session', async (t) => {
  const server = new PageServer({ image: Image.open([{ buffer: randomImage(8) }]), token: 'probe token' });
  t.teardown(() => server.close());
  const a = await server.listen('tcp:127.0.0.1:0');
  const source = `tcp:127.0.0.1:${a.kind === 'tcp' ? a.port : 0}`;
  const ready = await SourceConnection.probe({ source, token: 'probe token' });
  t.equal(ready.regions.length, 1);
  t.equal(ready.regions[0].contentLength, 8 * PAGE);
  t.equal(server.sessions.size, 0, 'no session was made for it');
  await t.rejects(SourceConnection.probe({ source, token: 'another token' }), { code: 'ERR_AUTH_FAILED' }, 'a wrong token is found out by the probe');
  await t.rejects(SourceConnection.probe({ source }), { code: 'ERR_AUTH_REQUIRED' });
  await server.close();
  await t.rejects(SourceConnection.probe({ source, token: 'probe token' }), {
    code: 'ERR_SOURCE_UNREACHABLE',
    message: new RegExp(`cannot reach the source at ${source}: nothing listens there`),
  });
});

t.test('the source sums whichever side is smaller, and both ways agree', async (t) => {
  const bytes = randomImage(64, 5);
  const image = Image.open([{ buffer: bytes }]);
  t.teardown(() => image.close());
  const kept = await pageChecksum(bytes, PAGE, 0, [
    [3, 2],
    [40, 1],
  ]);
  // Most pages skipped: the kept ones are hashed directly.
  const mostSkipped = await image.checksum(0, [
    [0, 3],
    [5, 35],
    [41, 23],
  ]);
  t.equal(mostSkipped, kept.toString(16).padStart(16, '0'));
  // Few skipped: the whole region's sum less the skipped pages.
  const fewSkipped = await image.checksum(0, [[3, 2]]);
  const rest = await pageChecksum(bytes, PAGE, 0, [
    [0, 3],
    [5, 59],
  ]);
  t.equal(fewSkipped, rest.toString(16).padStart(16, '0'));
  t.throws(
    () => checkVerify({ regions: [{ id: 0, skip: Array.from({ length: 2 * 100_001 }, (_, i) => (i % 2 ? 1 : i)) }] }, [{ length: 1 << 30, pageSize: PAGE }]),
    {
      code: 'ERR_PROTOCOL_OUT_OF_RANGE',
      message: /more than 100000 ranges/,
    },
  );
});

t.test('a source answers one done per connection; asking again is a protocol error', async (t) => {
  const dir = tempDir(t);
  const server = new PageServer({ image: Image.open([{ buffer: randomImage(16) }]) });
  t.teardown(() => server.close());
  await server.listen(`unix:${join(dir, 's.sock')}`);
  const dest = await Destination.connect({ source: `unix:${join(dir, 's.sock')}` });
  t.teardown(() => dest.close());
  t.equal((await dest.finish()).digestMatch, true);
  // The same connection, by hand: a second done.
  const raw = netConnect(join(dir, 's.sock'));
  await once(raw, 'connect');
  const reader = new FrameReader(raw);
  raw.write(encodeFrame({ t: 'hello', protocol: 1, software: 'test', nonce: Buffer.alloc(32, 1) }));
  await reader.next(['challenge'], 2000);
  raw.write(encodeFrame({ t: 'auth' }));
  const welcome = await reader.next(['welcome'], 2000);
  raw.write(encodeFrame({ t: 'options', window: { forward: 0, backward: 0 }, background: { enabled: false, rateBytesPerSecond: 0 } }));
  const channels = await Promise.all(
    (['urgent', 'bulk'] as const).map(async (channel) => {
      const c = netConnect(join(dir, 's.sock'));
      await once(c, 'connect');
      c.write(encodeFrame({ t: 'attach', session: welcome.session, channel, ticket: welcome.tickets[channel] }));
      await new FrameReader(c).next(['attached'], 2000);
      return c;
    }),
  );
  t.teardown(() => channels.forEach((c) => c.destroy()));
  raw.write(encodeFrame({ t: 'start' }));
  await reader.next(['started'], 2000);
  raw.write(encodeFrame({ t: 'done' }));
  await reader.next(['digest'], 5000);
  raw.write(encodeFrame({ t: 'done' }));
  await t.rejects(reader.next(['digest'], 5000), { code: 'ERR_PROTOCOL_MALFORMED', message: /unexpected 'done'/ });
  raw.destroy();
});

t.test('a probe of a source older than the probe counts its welcome as an answer', async (t) => {
  const source = await fakeSource(t, () => fakeWelcome({ regions: [{ id: 0, name: 'old', length: 32 * PAGE, pageSize: PAGE }] }));
  const ready = await SourceConnection.probe({ source });
  t.equal(ready.regions[0].length, 32 * PAGE);
});

t.test('what the installed-pages check says when it could not check', async (t) => {
  const installed = [{ region: 0, sum: 5n, pages: 10, skip: [] as number[] }];
  t.match(compareInstalled(installed, undefined), { result: 'unavailable', unchecked: 'older-source' });
  t.match(compareInstalled([{ region: 0, sum: 0n, pages: 10, skip: null }], []), { result: 'unavailable', unchecked: 'too-fragmented' });
  t.match(compareInstalled([{ region: 0, sum: 0n, pages: 0, skip: [0, 10] }], []), { result: 'unavailable', unchecked: 'nothing-installed' });
  t.match(compareInstalled(installed, [{ id: 0, sum: '0000000000000005', pages: 10 }]), { result: 'match', checkedPages: 10 });
  t.match(compareInstalled(installed, [{ id: 0, sum: '0000000000000006', pages: 10 }]), { result: 'mismatch', mismatchedRegions: [0] });
});

t.test('a piece of a held-pages bitmap outside its region is refused', async (t) => {
  const regions = [{ length: 64 * PAGE, pageSize: PAGE }]; // an 8-byte bitmap
  t.same(checkHaveChunk({ t: 'have', region: 0, offset: 4, bitmap: new Uint8Array(4) }, regions), { region: 0, offset: 4, bitmap: new Uint8Array(4) });
  for (const bad of [
    { t: 'have', region: 1, offset: 0, bitmap: new Uint8Array(1) },
    { t: 'have', region: 0, offset: 5, bitmap: new Uint8Array(4) },
    { t: 'have', region: 0, offset: -1, bitmap: new Uint8Array(1) },
    { t: 'have', region: 0, offset: 0, bitmap: 'no' },
  ]) {
    t.throws(() => checkHaveChunk(bad as never, regions), { code: 'ERR_PROTOCOL_OUT_OF_RANGE' });
  }
});

t.test('an image closed while its checksum is computed says so, and nothing reads freed memory', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'img');
  writeFileSync(path, randomImage(3 * 8192)); // three slices of the computation
  const image = Image.open([{ path }]);
  const summing = image.checksum(0, []);
  image.close(); // the server shutting down while a destination's `done` is answered
  await t.rejects(summing, { code: 'ERR_MAPPING_UNMAPPED' });
});

t.test('prefetch entries are checked against the image before a source keeps them', async (t) => {
  const regions = [
    { length: 64 * 4096, pageSize: 4096 },
    { length: 16 * 4096, pageSize: 4096 },
  ];
  const entry = (region: number, page: number) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE((BigInt(region) << 48n) | BigInt(page));
    return b;
  };
  const good = Buffer.concat([entry(0, 63), entry(1, 0), entry(0, 5)]);
  t.same(checkPrefetch({ t: 'prefetch', entries: good }, regions), good, 'entries inside the image pass as they came');
  t.throws(() => checkPrefetch({ t: 'prefetch', entries: good.subarray(0, 12) }, regions), { code: 'ERR_PROTOCOL_MALFORMED' }, 'not whole entries');
  t.throws(() => checkPrefetch({ t: 'prefetch', entries: 'x' as unknown as Uint8Array }, regions), { code: 'ERR_PROTOCOL_MALFORMED' });
  t.throws(() => checkPrefetch({ t: 'prefetch', entries: entry(0, 64) }, regions), { code: 'ERR_PROTOCOL_OUT_OF_RANGE' }, 'a page past the region');
  t.throws(() => checkPrefetch({ t: 'prefetch', entries: entry(2, 0) }, regions), { code: 'ERR_PROTOCOL_OUT_OF_RANGE' }, 'a region the image lacks');
  t.throws(
    () => checkPrefetch({ t: 'prefetch', entries: Buffer.alloc((MAX_PREFETCH_ENTRIES + 1) * 8) }, regions),
    { code: 'ERR_PROTOCOL_OUT_OF_RANGE' },
    'too many entries in one message',
  );
});

t.test('options.pageSizes: one page size per region, a power of two the region can be served in whole', async (t) => {
  const regions = [
    { length: 8 << 20, pageSize: 4096 },
    { length: 64 * 4096, pageSize: 4096 },
  ];
  t.same(checkPageSizes(undefined, regions), [1, 1], 'absent: the regions own pages');
  t.same(checkPageSizes([2 << 20, 4096], regions), [512, 1], '2 MiB huge pages over a 4 KiB-page region: 512 pages each');
  t.throws(() => checkPageSizes([2 << 20], regions), { code: 'ERR_PROTOCOL_MALFORMED' }, 'one per region');
  t.throws(() => checkPageSizes([3 << 20, 4096], regions), { code: 'ERR_PROTOCOL_OUT_OF_RANGE' }, 'not a power of two');
  t.throws(() => checkPageSizes([4 << 20, 4096], regions), { code: 'ERR_PROTOCOL_OUT_OF_RANGE' }, 'more than one run');
  t.throws(() => checkPageSizes([2048, 4096], regions), { code: 'ERR_PROTOCOL_OUT_OF_RANGE' }, 'smaller than the region page');
  t.throws(() => checkPageSizes([4096, 2 << 20], regions), { code: 'ERR_PROTOCOL_OUT_OF_RANGE' }, 'a region that is not whole such pages');
});

t.test('a connection closed at the cap of unauthenticated connections is told ERR_SOURCE_BUSY; the newcomer gets in', async (t) => {
  const { path, source } = await startServer(t);
  // The oldest: a destination that said hello and then waits (slow).
  const oldest = netConnect(path);
  await once(oldest, 'connect');
  const oldestReader = new FrameReader(oldest);
  oldest.write(encodeFrame({ t: 'hello', protocol: 1, software: 'test', nonce: Buffer.alloc(32, 1) }));
  await oldestReader.next(['challenge'], 5000);
  const silent: NetSocket[] = [];
  t.teardown(() => silent.forEach((s) => s.destroy()));
  for (let i = 0; i < MAX_UNPROVEN_CONNECTIONS; i++) {
    const s = netConnect(path);
    s.on('error', () => {});
    silent.push(s);
  }
  await Promise.all(silent.map((s) => once(s, 'connect')));
  // On the old main it was the newcomer that was closed, with no word: ERR_PEER_GONE.
  await t.rejects(oldestReader.next(['welcome'], 10_000), { code: ErrorCode.SOURCE_BUSY, message: /busy.*to authenticate.*try again/ });
  oldest.destroy();
  const probe = await SourceConnection.probe({ source, timeoutMs: 5000 });
  t.ok(probe.fingerprint, 'a destination arriving now is served');
});

t.test('a control channel cut while its data channels attach is reported as the cut (ERR_PEER_GONE), not as a failed authentication', async (t) => {
  const { path, server } = await startServer(t);
  const control = netConnect(path);
  await once(control, 'connect');
  const reader = new FrameReader(control);
  control.write(encodeFrame({ t: 'hello', protocol: 1, software: 'test', nonce: Buffer.alloc(32, 1) }));
  await reader.next(['challenge'], 5000);
  control.write(encodeFrame({ t: 'auth' }));
  const welcome = await reader.next(['welcome'], 5000);
  control.destroy(); // cut before `options`: the source ends the session
  await until('the source to end the session', () => server.sessions.size === 0, 10_000);
  const err = await rawExchange(path, encodeFrame({ t: 'attach', session: welcome.session, channel: 'urgent', ticket: welcome.tickets.urgent }));
  t.equal(err.code, ErrorCode.PEER_GONE);
  t.match(err.message, /session has ended: its control channel closed/);
  const unknown = await rawExchange(path, encodeFrame({ t: 'attach', session: 'f'.repeat(32), channel: 'urgent', ticket: Buffer.alloc(32) }));
  t.equal(unknown.code, ErrorCode.AUTH_FAILED, 'a session that never was is still an authentication failure');
});

t.test('a first connection turned away as busy (ERR_SOURCE_BUSY) is tried again, and the restore goes on', async (t) => {
  const image = randomImage(16, 3);
  const busy = await fakeServingSource(t, image, 'digest', { busyFirst: 2 });
  const dest = await Destination.connect({ source: busy.address, recovery: { retryDelayMs: { initial: 20, max: 100 } } });
  t.teardown(() => dest.close());
  t.equal((await dest.finish()).digestMatch, true, 'restored byte-exact on the third connection');
  t.equal(busy.connections(), 3);
});
