// pino JSON logs on stderr, so stdout stays free for results and --json stats.
import { pino, type Logger } from 'pino';

export type { Logger } from 'pino';

export function createLogger(options: { level?: string; name?: string } = {}): Logger {
  return pino({ name: options.name ?? 'uffd-postcopy', level: options.level ?? process.env.POSTCOPY_LOG_LEVEL ?? 'info' }, pino.destination(2));
}

/** A logger that drops everything (library use without logs). */
export const silentLogger: Logger = pino({ level: 'silent' });
