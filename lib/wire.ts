// The data-channel layouts (docs/PROTOCOL.md, "Data channel layouts"): the
// TypeScript home of their constants (addon/wire.h is the native one), for
// tests and tools that speak the data channels without the native engine.
// test/constants.test.ts compares the two constant by constant: a kind or a
// reason goes into both or that test fails.

export const PAGE_REQUEST_BYTES = 16;
export const RUN_HEADER_BYTES = 24;

/** PageRequest.kind and RunHeader.kind values. */
export const Kind = {
  request: 0x51455250, // "PREQ"
  dataRun: 0x41544144, // "DATA"
  zeroRun: 0x4f52455a, // "ZERO"
  bulkEnd: 0x20444e45, // "END "
  discardRun: 0x43534944, // "DISC": pages written at a live source since they were sent (missing again)
  switchover: 0x48435753, // "SWCH": a live source's workload runs at the destination from now on
  discardMark: 0x4b52414d, // "MARK": a discard round's runs end here (count: its number); the destination answers \`dropped\` once they are applied
  packedRun: 0x4b434150, // "PACK": a data run compressed (bulk, to a destination that asked): u32 length, then one zstd frame of count * pageSize bytes
} as const;

/** RunHeader.reason values. */
export const Reason = { requested: 0, window: 1, background: 2, prefetch: 3, precopy: 4 } as const;

/** A PageRequest: u32 kind, u32 region, u64 page, little-endian. */
export function encodePageRequest(region: number, page: number | bigint): Buffer {
  const b = Buffer.alloc(PAGE_REQUEST_BYTES);
  b.writeUInt32LE(Kind.request, 0);
  b.writeUInt32LE(region, 4);
  b.writeBigUInt64LE(BigInt(page), 8);
  return b;
}

/** A RunHeader: u32 kind, u32 region, u64 first page, u32 count, u32 reason, little-endian. */
export function encodeRunHeader(kind: number, region: number, firstPage: number | bigint, count: number, reason: number): Buffer {
  const b = Buffer.alloc(RUN_HEADER_BYTES);
  b.writeUInt32LE(kind, 0);
  b.writeUInt32LE(region, 4);
  b.writeBigUInt64LE(BigInt(firstPage), 8);
  b.writeUInt32LE(count, 16);
  b.writeUInt32LE(reason, 20);
  return b;
}
