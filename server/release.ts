// Release as sent: the source frees its image as its one destination installs
// it (never merely sends it), so a localhost move never holds two copies. The
// image must be shared memory this source may write (tmpfs, a memfd). This
// part decides who may be served (only the destination pages were freed for),
// frees what the destination reports installed, keeps the budget of pages sent
// and not yet confirmed, and says when the image has moved.
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import type { Image } from '../lib/image.js';
import { MAX_RUN_BYTES } from '../lib/limits.js';
import type { Logger } from '../lib/logger.js';
import { checkHaveChunk, type MessageOf } from '../lib/protocol.js';
import type { SourceSession } from './session.js';

/**
 * Release as sent, by default: at most 1/64 of the image (and at least 16
 * MiB) of pages sent and not yet confirmed installed. The destination reports
 * every 25 ms per GiB of image, so that still lets about 640 MiB/s through
 * whatever the image's size, and a move of 1 GiB or more peaks at 1.016x the
 * image, plus the two processes' own memory.
 */
export function defaultReleaseBudgetBytes(imageBytes: number): number {
  return Math.max(16 << 20, Math.ceil(imageBytes / 64 / MAX_RUN_BYTES) * MAX_RUN_BYTES);
}

export class ReleaseAsSent {
  readonly #image: Image;
  readonly #budgetBytes: number;
  readonly #log: Logger;
  /** Settles once the destination holds every page, was answered `done` and said bye. */
  readonly #consumed: { promise: Promise<void>; resolve: () => void };

  constructor(image: Image, budgetBytes: number, log: Logger) {
    if (!image.memoryFds())
      throw new PostcopyError(
        ErrorCode.IMAGE_INVALID,
        'release-as-sent frees the image as it is installed: the image must be shared memory this source may write (tmpfs, a memfd)',
      );
    this.#image = image;
    this.#budgetBytes = budgetBytes;
    this.#log = log;
    let resolve!: () => void;
    this.#consumed = { promise: new Promise<void>((r) => (resolve = r)), resolve };
  }

  /** Before listening: once pages are freed the image cannot be read back, so its digests and checksums are taken now. */
  begin(): Promise<void> {
    return this.#image.startReleasing();
  }

  whenConsumed(): Promise<void> {
    return this.#consumed.promise;
  }

  /** The budget in pages of each region's own size: the smallest region page size counts the most pages. */
  get budgetPages(): number {
    return Math.floor(this.#budgetBytes / Math.min(...this.#image.regions.map((r) => r.pageSize)));
  }

  /**
   * A new session: freeing the image as one destination installs it leaves
   * nothing for a second. Once pages are freed, only the destination they
   * were freed for may come back (a restarted source knows it from the
   * journal beside the image; its `have` is checked at start).
   */
  admit(resume: string | undefined, busy: boolean): void {
    const freed = this.#image.releasedPages;
    if (busy || (freed > 0 && resume !== this.#image.releasedFor))
      throw new PostcopyError(
        ErrorCode.IMAGE_CONSUMED,
        `this source frees its image as its destination installs it (release-as-sent): it serves one destination, ` +
          (busy ? 'and one is being served' : `and ${freed} page(s) were already freed for another (held only there)`),
      );
  }

  /**
   * At start: pages already freed exist only at the destination they were
   * freed for. A destination may start only when the pages it holds cover
   * every one of them (it is that destination, resuming); it is then the one
   * they are freed for.
   */
  admitHolder(session: SourceSession, held: { region: number; bitmap: Uint8Array }[]): void {
    const freed = this.#image.releasedPages;
    if (freed > 0) {
      for (const r of this.#image.regions) {
        const released = this.#image.releasedBitmap(r.id)!;
        const have = held.filter((h) => h.region === r.id).map((h) => h.bitmap);
        const missing = released.some((bits, i) => (bits & ~have.reduce((or, b) => or | (b[i] ?? 0), 0)) !== 0);
        if (missing)
          throw new PostcopyError(
            ErrorCode.IMAGE_CONSUMED,
            `this source frees its image as its destination installs it (release-as-sent): ${freed} page(s) are freed here and held only by that ` +
              `destination, and the pages this destination holds do not cover them (region ${r.id}); it cannot be served without them`,
          );
      }
    }
    this.#image.releasedFor = session.id;
  }

  /** The destination holds these pages for good: they are freed here, and leave the unconfirmed budget. */
  installed(session: SourceSession, msg: MessageOf<'installed'>): void {
    const piece = checkHaveChunk(msg, this.#image.regions);
    this.#image.release(piece.region, piece.offset, piece.bitmap);
    session.confirmInstalled(piece.region, piece.offset, piece.bitmap);
  }

  /** The destination said bye, after its digest (`answered`) or not: once it holds the whole image, the image has moved. */
  saidBye(session: SourceSession, answered: boolean): void {
    const total = this.#image.regions.reduce((n, r) => n + r.length / r.pageSize, 0);
    if (!answered || this.#image.releasedPages !== total) return;
    this.#log.info({ session: session.id, releasedPages: this.#image.releasedPages }, 'the destination holds the whole image: it has moved');
    this.#consumed.resolve();
  }
}
