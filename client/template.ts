// A template: one image filled once into shared memory on this host, for
// many VMMs (its clones) restoring the same image. Each image region becomes
// a memfd that this process maps shared and fills, lazily: a page is fetched
// from the source (or read from a local image) at most once for all clones,
// on the first clone's demand or by the background. Each clone's guest maps
// those memfds privately (copy on write) and registers them for MINOR and
// MISSING faults; its engine releases each fault with UFFDIO_CONTINUE from
// the template's page cache, so N clones hold one copy of the image plus what
// each writes. The handshake is in docs/VMM-HANDSHAKE.md ("Templates").
import { EventEmitter } from 'node:events';
import { closeSync, fstatSync, ftruncateSync, readFileSync } from 'node:fs';
import { ErrorCode, PostcopyError, asCodedError, type CodedError } from '../lib/errors.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { mapFile, memfdCreate, type Mapping } from '../lib/memory.js';
import type { RegionInfo } from '../lib/protocol.js';
import type { TransferOptions } from '../lib/transfer.js';
import { Image } from '../lib/image.js';
import { FaultEngine } from './fault-engine.js';
import { checkAgainstSource, type InstalledCheck } from './installed-checksum.js';
import type { LocalSessionOptions } from './local-session.js';
import type { DestinationSessionOptions, EngineFactory, PageSession } from './session.js';
import { openSession, type MemoryTarget } from './open-session.js';

export type TemplateOptions = (DestinationSessionOptions | LocalSessionOptions) & {
  /** Names the template in logs and in what VMMs are offered. */
  name: string;
};

/** What a clone is offered before its handshake: the template's regions, one memfd each, in order. */
export interface TemplateOffer {
  template: string;
  regions: { name: string; size: number; page_size: number }[];
}

/** Events: 'failed' (CodedError): the template can no longer be filled (its source was given up on). */
export class Template extends EventEmitter {
  readonly name: string;
  readonly regions: RegionInfo[];
  readonly fingerprint: string;
  readonly transfer: TransferOptions;
  /** The filler: puts pages into the template's memfds (client/fault-engine.ts fillsTemplate). */
  readonly engine: FaultEngine;
  readonly #session: PageSession;
  readonly #memfds: number[];
  readonly #mappings: Mapping[];
  readonly #checked: Promise<Image>;
  readonly #log: Logger;
  #check: InstalledCheck | null = null;
  #image: Image | null = null;
  #closed = false;

  private constructor(name: string, session: PageSession, made: { memfds: number[]; mappings: Mapping[] }, log: Logger) {
    super();
    this.name = name;
    this.#session = session;
    this.engine = session.engine;
    this.regions = session.regions;
    this.fingerprint = session.fingerprint;
    this.transfer = session.transfer;
    this.#memfds = made.memfds;
    this.#mappings = made.mappings;
    this.#log = log;
    session.on('failed', (err: CodedError) => this.emit('failed', err));
    this.#checked = this.#checkWhenFilled();
    this.#checked.catch(() => {});
  }

  /** Reaches the source (or opens the local image) and starts filling the template's memory. */
  static async open(options: TemplateOptions, logger?: Logger): Promise<Template> {
    const log = (logger ?? options.logger ?? silentLogger).child({ template: options.name });
    const memory = new TemplateMemory(options.name, log);
    const { name: _, ...from } = options;
    let session: PageSession;
    try {
      const opened = await openSession('image' in from ? { kind: 'image', ...from, logger: log } : { kind: 'source', ...from, logger: log }, memory);
      if (opened.kind !== 'session') throw new PostcopyError(ErrorCode.INTERNAL, 'a template is filled, never mapped in place');
      session = opened.session;
    } catch (err) {
      memory.discard();
      throw err;
    }
    const made = memory.made!;
    const template = new Template(options.name, session, made, log);
    log.info({ regions: template.regions.length, bytes: template.regions.reduce((n, r) => n + r.length, 0) }, 'template filling: clones share its memory');
    return template;
  }

  /**
   * Why the guest regions of process `pid` are not this template's clone
   * (docs/VMM-HANDSHAKE.md, "Templates"), or null when each maps, at its
   * place, the memfd of the template region holding it: read from
   * /proc/PID/maps. A plain VMM (anonymous memory, or its own file) would
   * never see a MINOR fault; its MISSING faults would wait forever.
   */
  notClonedBy(pid: number, guest: readonly { base_host_virt_addr: number; size: number; offset: number }[]): string | null {
    const files = this.#memfds.map((fd) => fstatSync(fd));
    let maps: { start: number; end: number; offset: number; dev: string; inode: number }[];
    try {
      maps = readFileSync(`/proc/${pid}/maps`, 'utf8')
        .split('\n')
        .filter((l) => l)
        .map((l) => {
          const [range, , offset, dev, inode] = l.split(/\s+/);
          const [start, end] = range.split('-').map((h) => parseInt(h, 16));
          return { start, end, offset: parseInt(offset, 16), dev, inode: Number(inode) };
        });
    } catch (err) {
      return `its memory map cannot be read (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`;
    }
    for (const [i, g] of guest.entries()) {
      let regionStart = 0;
      const k = this.regions.findIndex((r) => {
        const inside = g.offset >= regionStart && g.offset + g.size <= regionStart + r.length;
        if (!inside) regionStart += r.length;
        return inside;
      });
      if (k < 0) return `region ${i} lies outside the template`;
      const file = files[k];
      const dev = `${hex2((file.dev >>> 8) & 0xfff)}:${hex2((file.dev & 0xff) | ((file.dev >>> 12) & 0xfff00))}`; // as /proc/PID/maps prints it
      // Every mapping over the region is the template's memfd, at the region's place in it.
      for (let at = g.base_host_virt_addr; at < g.base_host_virt_addr + g.size;) {
        const m = maps.find((x) => at >= x.start && at < x.end);
        if (!m || m.inode !== file.ino || m.dev !== dev || m.offset + (at - m.start) !== g.offset - regionStart + (at - g.base_host_virt_addr))
          return `region ${i} at 0x${g.base_host_virt_addr.toString(16)} does not map the template's memory it was offered (a plain VMM?)`;
        at = m.end;
      }
    }
    return null;
  }

  /** The offer a clone receives before its handshake, and the memfds that go with it (the caller sends them; they stay ours). */
  offer(): { payload: Buffer; fds: number[] } {
    const offer: TemplateOffer = { template: this.name, regions: this.regions.map((r) => ({ name: r.name, size: r.length, page_size: r.pageSize })) };
    return { payload: Buffer.from(JSON.stringify(offer)), fds: [...this.#memfds] };
  }

  /** The template's memory as an image once every page is in and matched the source (or the local image); rejects when it cannot be. */
  whenChecked(): Promise<Image> {
    return this.#checked;
  }

  /** How the template's fill went: state, the check against the source, and the filler's figures. */
  status(): { state: string; installedCheck: InstalledCheck | null; residentPages: number; totalPages: number; pagesRequested: number; bytesReceived: number } {
    const s = this.engine.stats();
    return {
      state: this.#session.state,
      installedCheck: this.#check,
      residentPages: s.residentPages,
      totalPages: s.totalPages,
      pagesRequested: s.pagesRequested,
      bytesReceived: s.bytesReceived,
    };
  }

  async #checkWhenFilled(): Promise<Image> {
    await this.#session.whenResident();
    const { check, pagesSent } = await checkAgainstSource(this.#session, this.transfer);
    this.#check = check;
    if (check.result !== 'match') {
      this.#session.release();
      const err = new PostcopyError(
        check.result === 'mismatch' ? ErrorCode.DIGEST_MISMATCH : ErrorCode.UNSUPPORTED,
        check.result === 'mismatch'
          ? `the template's pages differ from the source image (regions ${check.mismatchedRegions.join(', ')})`
          : `the template's pages could not be checked against the source (${check.unchecked})`,
      );
      this.#log.error({ code: err.code, ...check }, 'template filled, but not usable');
      throw err;
    }
    this.#session.verified({ checkedPages: check.checkedPages });
    // Read back through the memfds: the same image, the same fingerprint, or no clone is told it matches.
    const image = Image.open(this.#memfds.map((fd, i) => ({ fd, name: this.regions[i].name })));
    if (image.fingerprint !== this.fingerprint) {
      image.close();
      throw new PostcopyError(ErrorCode.DIGEST_MISMATCH, "the template's memory does not read back as the image it was filled from");
    }
    this.#image = image;
    this.#log.info({ sourcePagesSent: pagesSent, checkedPages: check.checkedPages }, 'template filled: every page is in and matches the source image');
    return image;
  }

  /** Stops filling and lets go of the memory (clones keep what they mapped). Call once no clone is served. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#session.close();
    this.#image?.close();
    release({ memfds: this.#memfds, mappings: this.#mappings });
  }
}

/** A template's memory as a session's target: one memfd per image region, made once the regions are known, filled by an engine of its own. */
class TemplateMemory implements MemoryTarget {
  readonly kind = 'template';
  readonly engineFor: EngineFactory;
  made: { memfds: number[]; mappings: Mapping[] } | null = null;

  constructor(name: string, log: Logger) {
    this.engineFor = (regions, local) => {
      const made = makeMemory(name, regions);
      this.made = made;
      const engine = new FaultEngine({
        fillsTemplate: true,
        sourceRegions: regions.map((r) => ({ pages: r.length / r.pageSize, pageSize: r.pageSize })),
        regions: made.mappings.map((m, i) => ({ base: m.address, fillAddress: m.address, length: regions[i].length, pageSize: regions[i].pageSize })),
        checksumInstalled: true,
        logger: log,
        ...(local ? { local } : {}),
      });
      engine.start();
      return engine;
    };
  }

  /** A session that never opened: lets go of the memory made for it. */
  discard(): void {
    if (this.made) release(this.made);
  }
}

/** One memfd per image region, sized to it and mapped shared here. */
function makeMemory(name: string, regions: RegionInfo[]): { memfds: number[]; mappings: Mapping[] } {
  const made: { memfds: number[]; mappings: Mapping[] } = { memfds: [], mappings: [] };
  try {
    for (const [i, r] of regions.entries()) {
      if (r.pageSize !== 4096)
        throw new PostcopyError(ErrorCode.UNSUPPORTED, `image region ${i} has ${r.pageSize}-byte pages; a template holds 4 KiB-page images only`);
      const fd = memfdCreate(`uffd-postcopy-template-${name}-${i}`);
      made.memfds.push(fd);
      ftruncateSync(fd, r.length);
      made.mappings.push(mapFile(fd, r.length, { shared: true }));
    }
  } catch (err) {
    release(made);
    throw asCodedError(err);
  }
  return made;
}

function release(made: { memfds: number[]; mappings: Mapping[] }): void {
  for (const m of made.mappings.splice(0)) m.unmap();
  for (const fd of made.memfds.splice(0)) closeSync(fd);
}

function hex2(n: number): string {
  return n.toString(16).padStart(2, '0');
}
