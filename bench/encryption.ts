// postcopy bench encryption: what sealing the TCP data channels costs. The
// same source image over TCP loopback, plaintext and sealed (AES-256-GCM),
// interleaved round by round (these machines drift): fault latency (one
// thread touching every page once in the floor's seeded random order, pure on
// demand) and background throughput (the whole image streamed, no faults).
// Reports each round, the medians, and sealed / plaintext.
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination } from '../client/destination.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { floorImageFile } from './source.js';
import { median, round } from './latency.js';
import { removeScratchDir, scratchDir } from './cleanup.js';

type Mode = 'plaintext' | 'sealed';
const TOKEN = 'bench encryption';

interface Round {
  mode: Mode;
  faultP50Us: number;
  faultP99Us: number;
  bulkGBps: number;
}

async function once(image: Image, pages: number, mode: Mode, seed: number): Promise<Round> {
  const server = new PageServer({ image, token: TOKEN, plaintextTcp: mode === 'plaintext' });
  const a = await server.listen('tcp:127.0.0.1:0');
  const source = `tcp:127.0.0.1:${a.kind === 'tcp' ? a.port : 0}`;
  try {
    const common = { source, token: TOKEN, acceptPlaintextTcp: mode === 'plaintext' } as const;
    const onDemand = await Destination.connect({ ...common, window: { forward: 0, backward: 0 }, background: { enabled: false } });
    let latency: Float64Array;
    try {
      const region = onDemand.regions[0].mapping;
      latency = Float64Array.from((await touchPages(region.address, pages, shuffledOrder(pages, seed), { mapping: region })).latencyNs).sort();
      await onDemand.finish();
    } finally {
      onDemand.close();
    }
    const streamed = await Destination.connect({ ...common, window: { forward: 0, backward: 0 }, background: { enabled: true } });
    let report;
    try {
      report = await streamed.finish();
    } finally {
      streamed.close();
    }
    return {
      mode,
      faultP50Us: round(latency[latency.length >> 1] / 1e3),
      faultP99Us: round(latency[Math.floor(latency.length * 0.99)] / 1e3),
      bulkGBps: round(report.bytes / (report.fullResidencyMs / 1e3) / 1e9),
    };
  } finally {
    await server.close();
  }
}

export async function encryptionBench(pages: number, rounds: number, seed = 1): Promise<EncryptionResult> {
  const dir = scratchDir('postcopy-bench-');
  const image = Image.open([{ path: floorImageFile(dir, pages) }]);
  const results: Round[] = [];
  try {
    for (let r = 0; r < rounds; r++) {
      // Alternate which goes first, so neither always runs on a warmer machine.
      for (const mode of (r % 2 ? ['sealed', 'plaintext'] : ['plaintext', 'sealed']) as Mode[]) results.push(await once(image, pages, mode, seed));
    }
  } finally {
    image.close();
    removeScratchDir(dir);
  }
  const of = (mode: Mode, k: keyof Omit<Round, 'mode'>) => median(results.filter((x) => x.mode === mode).map((x) => x[k]));
  const summary = Object.fromEntries(
    (['plaintext', 'sealed'] as Mode[]).map((m) => [m, { faultP50Us: of(m, 'faultP50Us'), faultP99Us: of(m, 'faultP99Us'), bulkGBps: of(m, 'bulkGBps') }]),
  );
  return {
    case: 'encryption',
    transport: 'tcp',
    pages,
    rounds,
    results,
    median: summary,
    ratio: {
      faultP50: round(of('sealed', 'faultP50Us') / of('plaintext', 'faultP50Us')),
      bulkThroughput: round(of('sealed', 'bulkGBps') / of('plaintext', 'bulkGBps')),
    },
  };
}

export interface EncryptionResult {
  case: 'encryption';
  transport: 'tcp';
  pages: number;
  rounds: number;
  results: Round[];
  /** Medians over the rounds, by mode. */
  median: Record<string, { faultP50Us: number; faultP99Us: number; bulkGBps: number }>;
  /** Sealed over plaintext. */
  ratio: { faultP50: number; bulkThroughput: number };
}

/** The encryption bench as a table: plaintext beside sealed, and sealed's cost as a ratio. */
export function encryptionTable(r: EncryptionResult): string {
  const p = r.median.plaintext;
  const s = r.median.sealed;
  return [
    '| figure (TCP, median of rounds) | plaintext | sealed | sealed / plaintext |',
    '| --- | --- | --- | --- |',
    `| fault p50 | ${p.faultP50Us} µs | ${s.faultP50Us} µs | ${r.ratio.faultP50} |`,
    `| fault p99 | ${p.faultP99Us} µs | ${s.faultP99Us} µs | |`,
    `| bulk | ${p.bulkGBps} GB/s | ${s.bulkGBps} GB/s | ${r.ratio.bulkThroughput} |`,
    '',
  ].join('\n');
}
