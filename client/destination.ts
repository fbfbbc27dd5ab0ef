// A destination that restores an image into memory of its own: it maps one
// region per image region, registers them with a userfaultfd, and lets a
// session fill them, from a source (DestinationSession) or from a local image
// (LocalSession); on full residency it checks the digests.
//
// The memory is unmapped only when nothing can touch it any more: a workload
// started with touchPages({mapping}) pins its region, and a session that gives
// up first releases every waiting thread (the userfaultfd is closed, so they
// read zeros) instead of unmapping under them.
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import type { Userfaultfd } from '../lib/uffd.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { digestOf } from '../lib/digest.js';
import type { TransferOptions } from '../lib/transfer.js';
import type { DestinationSessionOptions, PageSession, RecoveryStatus } from './session.js';
import type { LocalSessionOptions } from './local-session.js';
import type { StoreSessionOptions } from './store-session.js';
import type { FaultEngine, DestinationStats } from './fault-engine.js';
import { openSession, type PagesFrom, type TakenMemory } from './open-session.js';
import { OwnMemory, type RestoredRegion } from './own-memory.js';
import { layoutOf, type WorkingSet } from './working-set.js';
import { summarize, type RestoreReport } from './report.js';

export { DEFAULT_TRANSFER } from '../lib/transfer.js';
export type { RestoredRegion } from './own-memory.js';

/** Where the pages come from: a source (`source`, DestinationSessionOptions), a local image (`image`, LocalSessionOptions) or an image in a store (`storeImage`, StoreSessionOptions). */
export type DestinationOptions = (DestinationSessionOptions | LocalSessionOptions | StoreSessionOptions) & {
  /** Pin the fault engine's threads to this CPU. */
  engineCpu?: number;
  /** Keep the pages faulted on while missing, in first-touch order: workingSet() returns them. */
  recordWorkingSet?: boolean;
  /** Back the restored memory with transparent huge pages (OwnMemoryOptions.transparentHugePages). */
  transparentHugePages?: boolean;
};

export class Destination {
  readonly regions: RestoredRegion[];
  readonly session: PageSession;
  readonly #uffd: Userfaultfd;
  readonly #log: Logger;
  #closed = false;

  private constructor(session: PageSession, memory: OwnMemory, log: Logger) {
    this.session = session;
    this.#uffd = memory.uffd;
    this.regions = memory.regions;
    this.#log = log;
    // Given up: stop the engine, then close the userfaultfd so every thread
    // waiting on a missing page wakes (reading zeros) and can finish.
    session.once('failed', () => {
      session.engine.stop();
      this.#uffd.close();
    });
  }

  /**
   * Connects to the source (or opens the local image), maps and registers the
   * regions, and starts the transfer. Touching the regions faults pages in.
   */
  static async connect(options: DestinationOptions): Promise<Destination> {
    const opened = await Destination.open(options);
    if (!(opened instanceof Destination)) throw new PostcopyError(ErrorCode.INTERNAL, 'memory taken in place where none was asked for');
    return opened;
  }

  /**
   * As connect(); `inPlace` (with a source): the source's memory itself is
   * taken and mapped here when the source offers it (TakenMemory: nothing is
   * copied and nothing faults), else its pages are copied as by connect().
   */
  static async open(options: DestinationOptions & { inPlace?: boolean }): Promise<Destination | TakenMemory> {
    const log = options.logger ?? silentLogger;
    const { inPlace, engineCpu, recordWorkingSet, transparentHugePages, ...rest } = options;
    const memory = new OwnMemory({
      logger: log,
      ...(engineCpu !== undefined ? { engineCpu } : {}),
      ...(recordWorkingSet ? { recordWorkingSet } : {}),
      ...(transparentHugePages ? { transparentHugePages } : {}),
    });
    const from: PagesFrom =
      'storeImage' in rest ? { kind: 'store', ...rest } : 'image' in rest ? { kind: 'image', ...rest } : { kind: inPlace ? 'in-place' : 'source', ...rest };
    try {
      const opened = await openSession(from, memory);
      return opened.kind === 'taken' ? opened.memory : new Destination(opened.session, memory, log);
    } catch (err) {
      memory.discard();
      throw err;
    }
  }

  get engine(): FaultEngine {
    return this.session.engine;
  }

  get transfer(): TransferOptions {
    return this.session.transfer;
  }

  stats(): DestinationStats {
    return this.session.stats();
  }

  /** The pages faulted on while missing so far, in first-touch order (with recordWorkingSet). */
  workingSet(): WorkingSet {
    return { ...layoutOf(this.regions.map((r) => r.info)), fingerprint: this.session.fingerprint, entries: this.engine.faultedPages() };
  }

  status(): RecoveryStatus {
    return this.session.status();
  }

  /**
   * Waits until every page is resident, compares each region's SHA-256 with the
   * source's, and returns the report. Rejects with ERR_DIGEST_MISMATCH when they
   * differ, or with the session's error when it gives up.
   */
  async finish(): Promise<RestoreReport> {
    await this.session.whenResident();
    const stats = this.session.finalStats();
    // Every page is resident: nothing can fault any more, so unregister and read freely.
    for (const r of this.regions) this.#uffd.unregister(r.mapping.address, r.mapping.length);
    const local = await Promise.all(this.regions.map((r) => digestOf(r.mapping.buffer())));
    const remote = await this.session.exchangeDigest(summarize(stats, this.transfer, this.session.engine.regions));
    const digestMatch = remote.regions.length === local.length && remote.regions.every((r) => local[r.id] === r.sha256);
    const report = {
      ...summarize(stats, this.transfer, this.session.engine.regions),
      digestMatch,
      sha256: local,
      source: remote.stats,
      recovery: this.session.status(),
    };
    if (!digestMatch) {
      // The report goes with the error: what happened matters most when it went wrong.
      const err = new PostcopyError(ErrorCode.DIGEST_MISMATCH, 'the restored memory differs from the source image', { local, remote: remote.regions, report });
      this.session.fail(err);
      throw err;
    }
    this.session.verified({ sha256: local });
    report.recovery = this.session.status();
    this.#log.info(report, 'restore finished');
    return report;
  }

  /**
   * Stops the engine and says bye to the source; `keepMemory` leaves the
   * mappings mapped. A mapping a workload still touches (pinned) is left to
   * be unmapped when that workload lets go of it.
   */
  close(options: { keepMemory?: boolean } = {}): void {
    if (this.#closed) return;
    this.#closed = true;
    this.session.close(); // joins the engine's threads before the userfaultfd they read is closed
    this.#uffd.close();
    if (options.keepMemory) return;
    for (const r of this.regions) {
      try {
        r.mapping.unmap();
      } catch (err) {
        if ((err as PostcopyError).code !== ErrorCode.MAPPING_BUSY) throw err;
        this.#log.warn({ region: r.info.id }, 'a workload still touches this region; it is unmapped when the workload ends');
      }
    }
  }
}
