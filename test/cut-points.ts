// Random cut points for recovery tests and the soak: one fault (FIN, RST or
// blackhole, either direction) on one channel of a restore that goes through
// a FaultProxy, at a random byte offset chosen so that it must hit while
// pages are still due. Used by test/recovery.test.ts (a few dozen, in CI) and
// test/recovery.soak.ts (a thousand, by hand).
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination, type DestinationOptions } from '../client/destination.js';
import type { RecoveryOptions } from '../client/session.js';
import type { RestoreReport } from '../client/report.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { FaultProxy, type Direction, type FaultAction } from './fault-proxy.js';
import { PAGE } from './helpers.js';
import { encodeFrame } from '../lib/protocol.js';
import type { Test } from 'tap';

const CUT_TOKEN = 'cut points';

export interface CutCase {
  channel: 'control' | 'urgent' | 'bulk';
  direction: Direction;
  action: FaultAction;
}

/** Every channel x direction x action that can carry a fault (nothing flows up the bulk channel). */
export const CUT_CASES: readonly CutCase[] = (['bulk', 'urgent', 'control'] as const).flatMap((channel) =>
  (['fin', 'rst', 'blackhole'] as const).flatMap((action) =>
    (['down', 'up'] as const).filter((direction) => !(channel === 'bulk' && direction === 'up')).map((direction) => ({ channel, direction, action })),
  ),
);

/** A seeded xorshift generator, so a failing cut point can be replayed. */
export function seededRandom(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

/**
 * A byte offset on the case's channel, counted from the end of the
 * handshake, that the restore of `pages` pages must reach before it can end:
 * bulk carries every page (no workload), urgent every page (no background).
 */
export function cutOffset(c: CutCase, pages: number, random: (n: number) => number): number {
  const limit = { bulk: { down: pages * PAGE * 0.8, up: 0 }, urgent: { down: pages * PAGE * 0.5, up: pages * 4 }, control: { down: 60, up: 60 } }[c.channel][
    c.direction
  ];
  return 1 + random(Math.floor(limit));
}

export interface CutResult {
  report: RestoreReport;
  proxy: FaultProxy;
  /** The restored memory equals the image. */
  exact: boolean;
  /** From the fault to the pause, and from the pause to running again (ms); -1 when it did not pause. */
  detectMs: number;
  resumeMs: number;
}

/** Restores `bytes` through a proxy that applies one fault at `afterBytes`. */
export async function restoreThroughCut(
  t: Test,
  bytes: Buffer,
  c: CutCase,
  afterBytes: number,
  recovery: RecoveryOptions,
  sourceHeartbeat: { intervalMs: number; silenceMs: number },
): Promise<CutResult> {
  // A TCP source, as across hosts: its data channels carry sealed records, which the cuts split anywhere.
  const server = new PageServer({ image: Image.open([{ buffer: bytes }]), heartbeat: sourceHeartbeat, token: CUT_TOKEN });
  t.teardown(() => server.close());
  const a = await server.listen('tcp:127.0.0.1:0');
  const proxy = await FaultProxy.start(t, `tcp:127.0.0.1:${a.kind === 'tcp' ? a.port : 0}`);
  // Counted from the end of the handshake: a first connection that fails is an
  // error by design, not a case to recover. A data channel's handshake is one
  // frame each way, of a known size; the control channel's is measured.
  const index = { control: 0, urgent: 1, bulk: 2 }[c.channel];
  if (c.channel !== 'control') proxy.inject({ connection: index, direction: c.direction, afterBytes: dataHandshakeBytes(c) + afterBytes, action: c.action });
  const options: DestinationOptions = {
    source: proxy.address,
    token: CUT_TOKEN,
    recovery,
    ...(c.channel === 'urgent' ? { background: { enabled: false }, window: { forward: 2, backward: 0 } } : {}),
    ...(c.channel === 'bulk' ? { background: { enabled: true, rateBytesPerSecond: 64 << 20 } } : {}),
  };
  const dest = await Destination.connect(options);
  t.teardown(() => dest.close());
  let pausedAt = 0;
  let resumedAt = 0;
  dest.session.on('paused', () => (pausedAt ||= Date.now()));
  dest.session.on('resumed', () => (resumedAt ||= Date.now()));
  if (c.channel === 'control')
    proxy.inject({ connection: 0, direction: c.direction, afterBytes: proxy.carried(0, c.direction) + afterBytes, action: c.action });
  const region = dest.regions[0];
  const pages = region.mapping.length / PAGE;
  const touching = c.channel === 'bulk' ? Promise.resolve() : touchPages(region.mapping.address, pages, shuffledOrder(pages, 7), { mapping: region.mapping });
  const [report] = await Promise.all([dest.finish(), touching]);
  const firedAt = proxy.fired[0]?.at ?? 0;
  return {
    report,
    proxy,
    exact: region.mapping.buffer().equals(bytes),
    detectMs: pausedAt && firedAt ? pausedAt - firedAt : -1,
    resumeMs: pausedAt && resumedAt ? resumedAt - pausedAt : -1,
  };
}

/** The bytes of a data channel's attach (up) or attached (down) frame. */
function dataHandshakeBytes(c: CutCase): number {
  if (c.direction === 'down') return encodeFrame({ t: 'attached' }).length;
  return encodeFrame({ t: 'attach', session: '0'.repeat(32), channel: c.channel as 'urgent' | 'bulk', ticket: Buffer.alloc(32) }).length;
}
