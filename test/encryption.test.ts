// Data channels over TCP are sealed (AES-256-GCM, keys from the token and the
// handshake nonces): no page crosses in the clear, a tampered record is never
// installed (the session pauses and resumes), and a destination refuses a TCP
// source that offers plaintext.
import t from 'tap';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination } from '../client/destination.js';
import type { CodedError } from '../lib/errors.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { FaultProxy, type Direction } from './fault-proxy.js';
import { FAST_HEARTBEAT, FAST_RECOVERY, PAGE, fakeSource, fakeWelcome, randomImage } from './helpers.js';
import type { Test } from 'tap';

const TOKEN = 'sealed channels';
const FAST = FAST_RECOVERY;

async function tcpSource(t: Test, bytes: Buffer): Promise<{ server: PageServer; address: string }> {
  const server = new PageServer({ image: Image.open([{ buffer: bytes }]), token: TOKEN, heartbeat: FAST_HEARTBEAT });
  t.teardown(() => server.close());
  const a = await server.listen('tcp:127.0.0.1:0');
  return { server, address: `tcp:127.0.0.1:${a.kind === 'tcp' ? a.port : 0}` };
}

t.test('no page of the image crosses TCP in the clear', async (t) => {
  const bytes = randomImage(256);
  const { address } = await tcpSource(t, bytes);
  const proxy = await FaultProxy.start(t, address);
  proxy.capture();
  const dest = await Destination.connect({ source: proxy.address, token: TOKEN });
  t.teardown(() => dest.close());
  t.equal((await dest.finish()).digestMatch, true);
  const wire = Buffer.concat(proxy.captured);
  t.ok(wire.length > bytes.length, `the whole image crossed the link (${wire.length} bytes)`);
  let found = 0;
  for (let p = 0; p < 256; p += 17) if (wire.includes(bytes.subarray(p * PAGE + 100, p * PAGE + 164))) found++;
  t.equal(found, 0, 'not one sampled 64-byte stretch of any page appears on the wire');
});

for (const [channel, direction, connection] of [
  ['bulk', 'down', 2],
  ['urgent', 'down', 1],
  ['urgent', 'up', 1],
] as const) {
  t.test(`a byte flipped on the ${channel} channel (${direction}) is caught before anything of it is installed; the session resumes byte-exact`, async (t) => {
    const pages = 1024;
    const bytes = randomImage(pages, 9);
    const { address } = await tcpSource(t, bytes);
    const proxy = await FaultProxy.start(t, address);
    // Past the handshake frame, inside the sealed records.
    proxy.inject({ connection, direction: direction as Direction, afterBytes: direction === 'up' ? 400 : 64 * 1024 + 7, action: 'flip' });
    const urgent = channel === 'urgent';
    const dest = await Destination.connect({
      source: proxy.address,
      token: TOKEN,
      recovery: FAST,
      ...(urgent ? { background: { enabled: false }, window: { forward: 0, backward: 0 } } : {}),
    });
    t.teardown(() => dest.close());
    const pauses: string[] = [];
    dest.session.on('paused', (err: CodedError) => pauses.push(err.code));
    const region = dest.regions[0].mapping;
    const [report] = await Promise.all([
      dest.finish(),
      urgent ? touchPages(region.address, pages, shuffledOrder(pages, 3), { mapping: region }) : Promise.resolve(),
    ]);
    t.equal(proxy.fired.length, 1, 'the byte was flipped');
    t.ok(pauses.includes('ERR_DATA_TAMPERED'), `the tampering was detected (${pauses.join(', ')})`);
    t.equal(report.digestMatch, true);
    t.ok(region.buffer().equals(bytes), 'every byte equals the image: the tampered record was never installed');
  });
}

t.test('a destination refuses a TCP source that offers plaintext data channels', async (t) => {
  const source = await fakeSource(t, () => fakeWelcome({ encryption: 'none' }), 'tcp');
  await t.rejects(Destination.connect({ source }), { code: 'ERR_AUTH_FAILED', message: /plaintext/ });
});
