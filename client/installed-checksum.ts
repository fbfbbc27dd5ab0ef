// The handler's end-of-session check: the installed-pages checksum the engine
// kept of every page it put into the guest (addon/page_checksum.h), compared
// with the source's over the same pages. Reading guest memory back would
// prove nothing (the guest has been writing to it all along); hashing each
// page as it goes in does.
import type { InstalledChecksum } from '../lib/native.js';
import { checksumHex } from '../lib/digest.js';
import type { RegionChecksum, VerifyRequest } from '../lib/protocol.js';
import type { TransferOptions } from '../lib/transfer.js';
import { summarize } from './report.js';
import type { PageSession } from './session.js';

export interface InstalledCheck {
  /**
   * match: every page installed from the source equals the source's;
   * mismatch: some differ (see mismatchedRegions); unavailable: the source
   * cannot check (an older source) or no page was installed from it.
   */
  result: 'match' | 'mismatch' | 'unavailable';
  /** Pages the comparison covered. */
  checkedPages: number;
  /** Source regions whose pages differ. */
  mismatchedRegions: number[];
  /** Why some or all pages went unchecked: a source too old to check, regions too fragmented to list, or none installed from the source. */
  unchecked?: 'older-source' | 'too-fragmented' | 'nothing-installed';
}

/** What to ask the source: the regions this destination installed pages of, and the pages it left out. */
export function verifyRequest(local: readonly InstalledChecksum[]): VerifyRequest {
  return { regions: local.filter((c) => c.pages > 0 && c.skip !== null).map((c) => ({ id: c.region, skip: c.skip as number[] })) };
}

/** Compares the engine's checksums with the source's answer to verifyRequest(local). */
export function compareInstalled(local: readonly InstalledChecksum[], remote: readonly RegionChecksum[] | undefined): InstalledCheck {
  const asked = verifyRequest(local).regions;
  const fragmented = local.some((c) => c.skip === null);
  if (!remote) return { result: 'unavailable', checkedPages: 0, mismatchedRegions: [], unchecked: 'older-source' };
  if (asked.length === 0)
    return { result: 'unavailable', checkedPages: 0, mismatchedRegions: [], unchecked: fragmented ? 'too-fragmented' : 'nothing-installed' };
  const mismatchedRegions: number[] = [];
  let checkedPages = 0;
  for (const { id } of asked) {
    const mine = local.find((c) => c.region === id) as InstalledChecksum;
    const theirs = remote.find((c) => c.id === id);
    checkedPages += mine.pages;
    if (!theirs || theirs.pages !== mine.pages || theirs.sum !== checksumHex(mine.sum)) mismatchedRegions.push(id);
  }
  return {
    result: mismatchedRegions.length ? 'mismatch' : 'match',
    checkedPages,
    mismatchedRegions,
    ...(fragmented ? { unchecked: 'too-fragmented' as const } : {}),
  };
}

/**
 * Once every page is resident: ends the session with the source (`done`,
 * with its final figures) and compares the pages installed with the source's.
 * `pagesSent`: what the source says it sent in all (a figure it reports, unchecked).
 */
export async function checkAgainstSource(session: PageSession, transfer: TransferOptions): Promise<{ check: InstalledCheck; pagesSent: unknown }> {
  // finalStats() stops the receiving threads first: a page one of them was still summing is then in the checksum.
  const stats = summarize(session.finalStats(), transfer, session.engine.regions);
  const local = session.engine.installedChecksum();
  const digest = await session.exchangeDigest(stats, verifyRequest(local));
  return { check: compareInstalled(local, digest.checksums), pagesSent: digest.stats.pagesSent };
}
