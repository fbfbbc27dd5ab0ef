// Logs go to stderr, so stdout stays free for results and --json stats: pino
// JSON lines, or pino-pretty's one line per record for a person at a terminal.
import { createRequire } from 'node:module';
import { pino, type Logger } from 'pino';

export type { Logger } from 'pino';

export type LogFormat = 'json' | 'pretty';
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export interface LoggerOptions {
  level?: string;
  name?: string;
  /** json (default) or pretty (colours when stderr is a terminal). */
  format?: LogFormat;
  /** Called before each record is written (the CLI clears its progress line there). */
  beforeWrite?: () => void;
}

export function createLogger(options: LoggerOptions = {}): Logger {
  const settings = { name: options.name ?? 'uffd-postcopy', level: options.level ?? process.env.POSTCOPY_LOG_LEVEL ?? 'info' };
  // Written synchronously (a record is never lost to a process that exits right
  // after it), by sonic-boom, which retries short writes and EAGAIN on a slow pipe.
  const stderr = pino.destination({ fd: 2, sync: true });
  const before = options.beforeWrite;
  if (before) {
    const write = stderr.write.bind(stderr);
    stderr.write = ((chunk: string) => {
      before();
      return write(chunk);
    }) as typeof stderr.write;
  }
  if (options.format === 'pretty') {
    // Loaded only when asked for: JSON logging (services, scripts) does not pay for it.
    const pretty = createRequire(import.meta.url)('pino-pretty') as (o: Record<string, unknown>) => NodeJS.WritableStream;
    return pino(
      settings,
      pretty({
        destination: stderr,
        sync: true,
        colorize: process.stderr.isTTY === true,
        singleLine: true,
        errorLikeObjectKeys: [],
        ignore: 'pid,hostname',
        translateTime: 'HH:MM:ss.l',
      }),
    );
  }
  return pino(settings, stderr);
}

/** A logger that drops everything (library use without logs). */
export const silentLogger: Logger = pino({ level: 'silent' });
