// A destination that restores an image into memory of its own: it maps one
// region per source region, registers them with a userfaultfd, runs the native
// fault engine over them, and on full residency checks the digests.
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import { mapAnonymous, type Mapping } from '../lib/memory.js';
import { Userfaultfd } from '../lib/uffd.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import type { RegionInfo } from '../lib/protocol.js';
import { digestOf } from '../server/image.js';
import type { TransferOptions } from '../server/session.js';
import { SourceConnection, transferOptions, type SourceOptions } from './source-connection.js';
import { FaultEngine, type DestinationStats } from './fault-engine.js';
import { summarize, type RestoreReport } from './report.js';

export { DEFAULT_TRANSFER } from './source-connection.js';

export interface DestinationOptions extends SourceOptions {
  timeoutMs?: number;
  /** Pin the fault engine's threads to this CPU. */
  engineCpu?: number;
}

export interface RestoredRegion {
  info: RegionInfo;
  mapping: Mapping;
}

export class Destination {
  readonly regions: RestoredRegion[];
  readonly engine: FaultEngine;
  readonly transfer: TransferOptions;
  readonly #connection: SourceConnection;
  readonly #uffd: Userfaultfd;
  readonly #log: Logger;
  #closed = false;

  private constructor(connection: SourceConnection, uffd: Userfaultfd, regions: RestoredRegion[], engine: FaultEngine, transfer: TransferOptions, log: Logger) {
    this.#connection = connection;
    this.#uffd = uffd;
    this.regions = regions;
    this.engine = engine;
    this.transfer = transfer;
    this.#log = log;
  }

  /** Connects, maps and registers the regions, and starts the transfer. Touching the regions faults pages in. */
  static async connect(options: DestinationOptions): Promise<Destination> {
    const log = options.logger ?? silentLogger;
    const transfer = transferOptions(options);
    const connection = await SourceConnection.open({ source: options.source, token: options.token, transfer, timeoutMs: options.timeoutMs });
    const mappings: Mapping[] = [];
    let uffd: Userfaultfd | null = null;
    let engine: FaultEngine | null = null;
    try {
      uffd = Userfaultfd.open({ nonBlocking: true });
      uffd.handshake(['THREAD_ID']);
      const regions = connection.regions.map((info) => {
        const mapping = mapAnonymous(info.length, { noReserve: true });
        mappings.push(mapping);
        uffd!.register(mapping.address, mapping.length, ['missing']);
        return { info, mapping };
      });
      const { urgentFd, bulkFd } = connection.takeChannels();
      engine = new FaultEngine({
        uffd: uffd.fd,
        regions: regions.map((r) => ({ base: r.mapping.address, length: r.mapping.length, pageSize: r.info.pageSize })),
        urgentFd,
        bulkFd,
        logger: log,
        ...(options.engineCpu !== undefined ? { cpu: options.engineCpu } : {}),
      });
      engine.start();
      await connection.start();
      log.info({ session: connection.session, regions: regions.length, bytes: regions.reduce((n, r) => n + r.info.length, 0), ...transfer }, 'restore started');
      const destination = new Destination(connection, uffd, regions, engine, transfer, log);
      const started = engine;
      void connection.failure().then((err) => {
        if (!destination.#closed && !started.complete) log.error({ code: err.code, err: err.message }, 'the control channel failed');
      });
      return destination;
    } catch (err) {
      engine?.stop(); // before the userfaultfd it reads is closed
      connection.close();
      uffd?.close();
      for (const m of mappings) m.unmap();
      throw err;
    }
  }

  stats(): DestinationStats {
    return this.engine.stats();
  }

  /**
   * Waits until every page is resident, compares each region's SHA-256 with the
   * source's, and returns the report. Rejects with ERR_DIGEST_MISMATCH when they differ.
   */
  async finish(): Promise<RestoreReport> {
    await this.engine.whenResident();
    const stats = this.engine.stats();
    // Every page is resident: nothing can fault any more, so unregister and read freely.
    for (const r of this.regions) this.#uffd.unregister(r.mapping.address, r.mapping.length);
    const local = await Promise.all(this.regions.map((r) => digestOf(r.mapping.buffer())));
    const remote = await this.#connection.finish(summarize(stats, this.transfer));
    const digestMatch = remote.regions.length === local.length && remote.regions.every((r) => local[r.id] === r.sha256);
    const report = { ...summarize(stats, this.transfer), digestMatch, sha256: local, source: remote.stats };
    this.#log.info(report, 'restore finished');
    if (!digestMatch) throw new PostcopyError(ErrorCode.DIGEST_MISMATCH, 'the restored memory differs from the source image', { local, remote: remote.regions });
    return report;
  }

  /** Stops the engine, says bye to the source; `keepMemory` leaves the mappings mapped. */
  close(options: { keepMemory?: boolean } = {}): void {
    if (this.#closed) return;
    this.#closed = true;
    // Say bye first, so the source reads a goodbye rather than a broken channel.
    this.#connection.close();
    this.engine.stop();
    this.#uffd.close();
    if (!options.keepMemory) for (const r of this.regions) r.mapping.unmap();
  }
}
