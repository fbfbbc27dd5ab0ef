// A destination session whose pages come from an image in this process
// (`--image`): no source process, no sockets. The engine installs each fault
// straight from the mapped image and fills the rest itself (ImageSupply in
// addon/fault_engine.cc); the digest at the end is the image's own. A
// template's clone is one too: its pages come from the template's memory
// (TemplateSupply), and its digest is the template's, once that matched.
import { EventEmitter } from 'node:events';
import type { CodedError } from '../lib/errors.js';
import { silentLogger, type Logger } from '../lib/logger.js';
import { checkVerify, type MessageOf, type RegionInfo, type VerifyRequest } from '../lib/protocol.js';
import { StateMachine, type TransitionTable } from '../lib/state-machine.js';
import { transferOptions, type TransferOptions } from '../lib/transfer.js';
import type { Image } from '../lib/image.js';
import type { ChannelFailure, DestinationStats, FaultEngine } from './fault-engine.js';
import { checkReplay } from './working-set.js';
import { sessionClosed, whenState, type EngineFactory, type PageSession, type RecoveryStatus, type ReplayOptions } from './session.js';

/** running: pages are installed from the image; resident: every page is in; verified: checked against the image. */
export type LocalState = 'running' | 'resident' | 'verified' | 'failed' | 'closed';

const TRANSITIONS: TransitionTable<LocalState> = {
  running: ['resident', 'failed', 'closed'],
  resident: ['verified', 'failed', 'closed'],
  verified: ['closed'],
  failed: ['closed'],
  closed: [],
};

/** Every state of a LocalSession, in the table's order. */
export const LOCAL_STATES = Object.keys(TRANSITIONS) as readonly LocalState[];

export interface LocalSessionOptions extends ReplayOptions {
  /** The image the pages come from (the caller opens and closes it). */
  image: Image;
  window?: Partial<TransferOptions['window']>;
  background?: Partial<TransferOptions['background']>;
  logger?: Logger;
}

/** What a clone's pages come from: a template (client/template.ts) as its clones see it. */
export interface CloneSource {
  readonly name: string;
  readonly regions: RegionInfo[];
  readonly fingerprint: string;
  readonly transfer: TransferOptions;
  /** The template's filler. */
  readonly engine: FaultEngine;
  /** The template's memory as an image once it is filled and checked. */
  whenChecked(): Promise<Image>;
}

/** Events: 'failed' (CodedError), 'state' (to, from). */
export class LocalSession extends EventEmitter implements PageSession {
  readonly engine: FaultEngine;
  readonly transfer: TransferOptions;
  readonly regions: RegionInfo[];
  readonly fingerprint: string;
  /** The image the pages came from, to answer `done` with. */
  readonly #image: () => Promise<Image>;
  readonly #machine: StateMachine<LocalState>;
  #lastError: CodedError | null = null;

  private constructor(
    image: () => Promise<Image>,
    fingerprint: string,
    transfer: TransferOptions,
    engine: FaultEngine,
    machine: StateMachine<LocalState>,
    regions: RegionInfo[],
  ) {
    super();
    this.#image = image;
    this.fingerprint = fingerprint;
    this.transfer = transfer;
    this.engine = engine;
    this.#machine = machine;
    this.regions = regions;
    machine.onChange((to, from) => this.emit('state', to, from));
    engine.on('complete', () => {
      if (this.#machine.is('running')) this.#machine.to('resident', { fullResidencyMs: Math.round(engine.stats().fullResidencyNs / 1e4) / 100 });
    });
    // The memory's owner leaving ends the session where it is noticed (its
    // hang-up, the userfaultfd closing); any other install failure is final.
    engine.on('channel-failed', (f: ChannelFailure) => {
      if (!f.targetGone) this.fail(f.error);
    });
  }

  /** Has `buildEngine` make the engine over the image's regions and starts installing. */
  static open(options: LocalSessionOptions, buildEngine: EngineFactory): LocalSession {
    const log = options.logger ?? silentLogger;
    const transfer = transferOptions(options);
    const image = options.image;
    const regions = image.regions.map(({ id, name, length, pageSize, contentLength }) => ({ id, name, length, pageSize, contentLength }));
    if (options.prefetch) checkReplay(options.prefetch, regions, image.fingerprint, log);
    const machine = new StateMachine<LocalState>('destination', 'running', TRANSITIONS, log);
    const engine = buildEngine(regions, {
      image: image.regions.map((r) => r.spec),
      window: transfer.window,
      background: transfer.background.enabled && !options.holdBackground,
      ...(options.prefetch ? { prefetch: options.prefetch.entries } : {}),
    });
    const session = new LocalSession(() => Promise.resolve(image), image.fingerprint, transfer, engine, machine, regions);
    if (engine.complete) machine.to('resident');
    log.info({ image: image.fingerprint.slice(0, 16), regions: regions.length, bytes: image.totalBytes, ...transfer }, 'restoring from a local image');
    return session;
  }

  /**
   * A clone of `template`: `buildEngine` makes the engine over the template's
   * regions, its pages coming from the template. Pages the template holds
   * already count as in at once; the rest follow as the template fills.
   */
  static openClone(template: CloneSource, options: { logger?: Logger }, buildEngine: EngineFactory): LocalSession {
    const log = options.logger ?? silentLogger;
    const machine = new StateMachine<LocalState>('destination', 'running', TRANSITIONS, log);
    const engine = buildEngine(template.regions, { template: template.engine });
    const session = new LocalSession(() => template.whenChecked(), template.fingerprint, template.transfer, engine, machine, template.regions);
    if (engine.complete) machine.to('resident');
    log.info({ template: template.name, regions: template.regions.length }, 'restoring a clone of the template');
    return session;
  }

  get state(): LocalState {
    return this.#machine.state;
  }

  status(): RecoveryStatus {
    return {
      state: this.state,
      session: 'local',
      source: 'image',
      resumes: 0,
      pausedMs: 0,
      ...(this.#lastError ? { lastError: { code: this.#lastError.code, message: this.#lastError.message } } : {}),
    };
  }

  stats(): DestinationStats {
    return this.engine.stats();
  }

  finalStats(): DestinationStats {
    return this.engine.stats();
  }

  /** The background fill starts now (it was held back while the working set was recorded). */
  startBackground(): void {
    this.engine.startBackground();
  }

  /** Nothing to wait for: the pages come from here. */
  whenRunning(): Promise<void> {
    return Promise.resolve();
  }

  whenResident(): Promise<void> {
    return whenState(this, ['resident', 'verified'], () => this.#lastError ?? sessionClosed());
  }

  /** The image's own digests (and installed-pages checksums, when asked), as a source would answer `done`. */
  async exchangeDigest(_stats: Record<string, unknown>, verify?: VerifyRequest): Promise<MessageOf<'digest'>> {
    await this.whenResident();
    // The request is ours, so it is well formed; checkVerify turns it into the pairs the image takes.
    const image = await this.#image();
    const checked = checkVerify(verify, image.regions);
    return { t: 'digest', ...(await image.answerDone(checked)), stats: { pagesSent: 0 } };
  }

  verified(details: Record<string, unknown> = {}): void {
    if (this.#machine.can('verified')) this.#machine.to('verified', details);
  }

  /** Nothing to let go of: there is no source connection. */
  release(): void {}

  fail(err: CodedError): void {
    if (!this.#machine.can('failed')) return;
    this.#lastError = err;
    this.#machine.to('failed', { code: err.code, error: err.message });
    this.emit('failed', err);
  }

  /** Stops the engine (and lets go of the image's mapping). */
  close(): void {
    if (this.#machine.is('closed')) return;
    this.engine.stop();
    this.#machine.to('closed', this.status() as unknown as Record<string, unknown>);
  }
}
