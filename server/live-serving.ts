// A live source's part in each control conversation (server/live.ts moves the
// workload): who may be served (one destination; past the switchover only
// that one, resuming), what starting means (precopy rounds for a destination
// that takes them, else the workload pauses before the first page), the
// destination's word that it runs, and what a lost control channel means:
// before the switchover the migration ends and the workload goes on here; past
// it the destination may run already, and the paused workload's memory is
// served to it when it resumes.
import { ErrorCode, PostcopyError, asCodedError, type CodedError } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import type { LiveMigration, PrecopyTarget } from './live.js';

export class LiveServing {
  readonly migration: LiveMigration;
  readonly #log: Logger;

  constructor(migration: LiveMigration, log: Logger) {
    this.migration = migration;
    this.#log = log;
  }

  /**
   * Throws unless a destination (resuming `resume`, or new) may be served
   * now; `active`: a session is being served already.
   */
  admit(resume: string | undefined, active: boolean): void {
    const live = this.migration;
    if (live.workload.gone && !live.pastSwitchover)
      throw new PostcopyError(
        ErrorCode.WORKLOAD_GONE,
        `the workload this live source was to move (pid ${live.workload.pid}) is gone: there is nothing to serve; asking again will not change it`,
      );
    // Past the switchover the workload runs at its destination: that destination alone may come back, resuming
    // from the pages it holds (this source restarted, or forgot its session after the grace).
    const destinationBack = live.pastSwitchover && resume !== undefined && !active;
    if (!destinationBack && (live.state !== 'waiting' || active))
      throw new PostcopyError(
        ErrorCode.UNSUPPORTED,
        live.pastSwitchover
          ? 'this live workload runs at its destination already: only that destination may resume'
          : 'a live source moves its workload to one destination',
      );
  }

  /**
   * Before the session starts: a destination that takes precopy gets it
   * (true); any other sees the workload paused before its first page.
   */
  async beforeStart(wantsPrecopy: boolean): Promise<boolean> {
    if (wantsPrecopy) return true;
    await this.migration.pauseForPostcopy();
    return false;
  }

  /**
   * The session started: with precopy, the rounds and the switchover run
   * (`failed` hears why they ended before it); a destination back past the
   * switchover runs the workload already (it resumes only once the marker
   * reached it).
   */
  started(session: PrecopyTarget & { id: string }, precopy: boolean, resumed: boolean, failed: (err: CodedError) => void): void {
    if (!precopy) {
      if (resumed) this.migration.destinationRunning();
      return;
    }
    this.migration.run(session, true).then(
      (report) => this.#log.info({ session: session.id, ...report }, 'the workload runs at the destination now'),
      (err) => {
        const e = asCodedError(err);
        this.#log.error({ session: session.id, code: e.code, err: e.message }, 'live migration ended before the switchover; the workload goes on here');
        failed(e);
      },
    );
  }

  /** The destination says its workload runs (after the switchover marker). */
  running(): void {
    this.migration.destinationRunning();
  }

  /** The destination holds every page: the workload may exit. */
  answered(): void {
    this.migration.finished();
  }

  /**
   * The destination's control channel is gone. Before the switchover the
   * migration ends and the workload goes on here (true); past it, the
   * session waits for the destination to resume (false).
   */
  controlLost(): boolean {
    if (this.migration.pastSwitchover) return false;
    this.migration.abort(new PostcopyError(ErrorCode.PEER_GONE, 'the destination left before the switchover; the workload goes on here'));
    return true;
  }
}
