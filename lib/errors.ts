// The one catalogue of error codes. Tests and callers match on `code`.
// Kernel errors keep their errno names (EEXIST, EAGAIN, ...) with `errno` and
// `syscall`, exactly like Node's own fs errors; everything else is listed here.

export const ErrorCode = {
  /** An argument has the wrong type (TypeError). */
  INVALID_ARG_TYPE: 'ERR_INVALID_ARG_TYPE',
  /** An argument has the right type but an unusable value (RangeError). */
  OUT_OF_RANGE: 'ERR_OUT_OF_RANGE',
  /** An option or name is not one we know (TypeError). */
  INVALID_ARG_VALUE: 'ERR_INVALID_ARG_VALUE',
  /** No way to obtain a userfaultfd on this machine (see vm.unprivileged_userfaultfd). */
  UFFD_UNAVAILABLE: 'ERR_UFFD_UNAVAILABLE',
  /** The userfaultfd was closed. */
  UFFD_CLOSED: 'ERR_UFFD_CLOSED',
  /** A mapping was used after unmap(). */
  MAPPING_UNMAPPED: 'ERR_MAPPING_UNMAPPED',
  /** unmap() of a mapping a running session still reads from. */
  MAPPING_BUSY: 'ERR_MAPPING_BUSY',
  /** The peer failed the token challenge, or we failed its challenge. */
  AUTH_FAILED: 'ERR_AUTH_FAILED',
  /** The server requires a token and none was configured. */
  AUTH_REQUIRED: 'ERR_AUTH_REQUIRED',
  /** A frame is malformed: bad length, unknown type, bad msgpack, missing fields. */
  PROTOCOL_MALFORMED: 'ERR_PROTOCOL_MALFORMED',
  /** The peer at a source's address does not speak this protocol (another service there, or one that says nothing). */
  NOT_A_SOURCE: 'ERR_NOT_A_SOURCE',
  /** A frame is larger than the negotiated maximum. */
  PROTOCOL_FRAME_TOO_LARGE: 'ERR_PROTOCOL_FRAME_TOO_LARGE',
  /** A page or region reference outside what was negotiated. */
  PROTOCOL_OUT_OF_RANGE: 'ERR_PROTOCOL_OUT_OF_RANGE',
  /** The peer speaks a protocol version we do not. */
  PROTOCOL_VERSION: 'ERR_PROTOCOL_VERSION',
  /** The peer closed the connection before the session finished. */
  PEER_GONE: 'ERR_PEER_GONE',
  /** The session was closed by its owner (close()) before what was awaited happened: nobody else's doing. */
  SESSION_CLOSED: 'ERR_SESSION_CLOSED',
  /** No answer within the configured time. */
  TIMEOUT: 'ERR_TIMEOUT',
  /** The destination's region does not equal the source's image. */
  DIGEST_MISMATCH: 'ERR_DIGEST_MISMATCH',
  /** The image cannot be served (size, alignment, unreadable). */
  IMAGE_INVALID: 'ERR_IMAGE_INVALID',
  /** A mistake on the command line: an unknown option, a missing or unusable value, a combination that cannot work. */
  USAGE: 'ERR_USAGE',
  /** The native addon could not be loaded (not built, or built for another Node). */
  ADDON_NOT_BUILT: 'ERR_ADDON_NOT_BUILT',
  /** Nothing answers at the source's address (refused, no such socket, unreachable, timed out). */
  SOURCE_UNREACHABLE: 'ERR_SOURCE_UNREACHABLE',
  /** An address given on the command line cannot be used. */
  INVALID_ADDRESS: 'ERR_INVALID_ADDRESS',
  /** Another live process already listens on that socket path or port. */
  ADDRESS_IN_USE: 'ERR_ADDRESS_IN_USE',
  /** A source serves a different image than the one this destination was restoring (size, regions or content). */
  IMAGE_MISMATCH: 'ERR_IMAGE_MISMATCH',
  /**
   * A release-as-sent image already partly freed for one destination: only that destination, holding every page
   * freed, may resume it; any other (or one whose held pages do not cover them) is refused.
   */
  IMAGE_CONSUMED: 'ERR_IMAGE_CONSUMED',
  /** The source stayed unreachable for longer than the give-up time. */
  SOURCE_LOST: 'ERR_SOURCE_LOST',
  /** The peer went silent: no heartbeat on the control channel, or no page while pages were due. */
  PEER_SILENT: 'ERR_PEER_SILENT',
  /** A call the engine cannot take in its current state (e.g. attaching channels twice). */
  ENGINE_STATE: 'ERR_ENGINE_STATE',
  /** A VMM of a `--template` handler did not map the template it was offered (a plain VMM): refused, its guest memory poisoned. */
  TEMPLATE_NOT_MAPPED: 'ERR_TEMPLATE_NOT_MAPPED',
  /** Too many VMM connections are still to send their handshake; this one was closed at once. */
  OVERLOADED: 'ERR_OVERLOADED',
  /** The source is busy: too many connections are still to authenticate, and this one, among the oldest, was closed to make room; try again. */
  SOURCE_BUSY: 'ERR_SOURCE_BUSY',
  /** A sealed data-channel record failed authentication (tampered, replayed or cut): nothing of it was used. */
  DATA_TAMPERED: 'ERR_DATA_TAMPERED',
  /** A working-set file that cannot be read: not one, truncated, or its checksum does not match (client/working-set.ts). */
  WORKING_SET_INVALID: 'ERR_WORKING_SET_INVALID',
  /** A working set recorded for another image layout (other regions or sizes): it is never applied. */
  WORKING_SET_MISMATCH: 'ERR_WORKING_SET_MISMATCH',
  /** Not a QEMU migration stream, or one that breaks its own format (server/qemu-snapshot.ts). */
  QEMU_STREAM_INVALID: 'ERR_QEMU_STREAM_INVALID',
  /** A QEMU migration stream that ends before it is whole. */
  QEMU_STREAM_TRUNCATED: 'ERR_QEMU_STREAM_TRUNCATED',
  /** QEMU's monitor (QMP) refused a command or went away. */
  QMP_FAILED: 'ERR_QMP_FAILED',
  /** A live source's workload exited or hung up before its memory moved (it keeps running if it can). */
  WORKLOAD_GONE: 'ERR_WORKLOAD_GONE',
  /** serve --live --resume-workload named a migration the workload that came is not paused for: it stays paused. */
  MIGRATION_MISMATCH: 'ERR_MIGRATION_MISMATCH',
  /** The object store has no such image (manifest), chunk or bucket: the message names it. */
  STORE_NOT_FOUND: 'ERR_STORE_NOT_FOUND',
  /** The object store did not answer, or kept failing (timeouts, 5xx, throttling), through every retry. */
  STORE_UNREACHABLE: 'ERR_STORE_UNREACHABLE',
  /** The object store refused our credentials or the request (wrong keys, no permission). */
  STORE_DENIED: 'ERR_STORE_DENIED',
  /** What the store holds is damaged: a chunk whose content is not its hash (after fetching it again), a manifest that does not parse. */
  STORE_CORRUPT: 'ERR_STORE_CORRUPT',
  /** An image name is taken already, or an image is still the parent of others (rm). */
  STORE_CONFLICT: 'ERR_STORE_CONFLICT',
  /** A combination this version cannot serve yet (the message says which); nothing was changed. */
  UNSUPPORTED: 'ERR_UNSUPPORTED',
  /** An exception nobody expected: a bug of ours, never blamed on a peer. */
  INTERNAL: 'ERR_INTERNAL',
  /** A state change the state machine does not allow (a bug, never a peer's doing). */
  INVALID_TRANSITION: 'ERR_INVALID_TRANSITION',
} as const;

export type ErrorCodeValue = (typeof ErrorCode)[keyof typeof ErrorCode];

/** `code` when it is one of ours (e.g. reported by a peer or native code), else `fallback`. */
export function asErrorCode(code: unknown, fallback: ErrorCodeValue): ErrorCodeValue {
  return (Object.values(ErrorCode) as string[]).includes(code as string) ? (code as ErrorCodeValue) : fallback;
}

/** An error with a stable `code`: one of ours (PostcopyError), or a kernel error (`code` its errno name, with `errno` and `syscall`) like Node's own. */
export type CodedError = Error & { code: string; errno?: number; syscall?: string };

/** A kernel error as Node reports its own: code 'ENOMEM', errno -12, syscall 'ioctl'. */
export function kernelError(code: string, errno: number, syscall: string, message: string): CodedError {
  return Object.assign(new Error(`${code}: ${message}, ${syscall}`), { code, errno, syscall });
}

/**
 * The error a native event reports: a kernel error when it carries an errno
 * (code = its name, errno, syscall), else one of our codes (`fallback` when
 * the code is not ours).
 */
export function errorOfEvent(
  e: { code?: string; errno?: number; syscall?: string },
  message: string,
  fallback: ErrorCodeValue,
  details?: Record<string, unknown>,
): CodedError {
  if (e.errno !== undefined && e.code) return kernelError(e.code, e.errno, e.syscall ?? 'unknown', message);
  return new PostcopyError(asErrorCode(e.code, fallback), message, details);
}

/** Our errors and kernel errors keep their code; anything else (a bug) is named ERR_INTERNAL, never disguised as a peer's doing. */
export function asCodedError(err: unknown): CodedError {
  if (err instanceof Error && typeof (err as CodedError).code === 'string') return err as CodedError;
  return Object.assign(err instanceof Error ? err : new Error(String(err)), { code: ErrorCode.INTERNAL });
}

/** An error of ours: a stable `code` plus optional details for logs. */
export class PostcopyError extends Error {
  readonly code: ErrorCodeValue;
  readonly details?: Record<string, unknown>;
  constructor(code: ErrorCodeValue, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'PostcopyError';
    this.code = code;
    if (details) this.details = details;
  }
}

export function invalidArgType(name: string, expected: string, actual: unknown): TypeError {
  const err = new TypeError(`The "${name}" argument must be ${expected}. Received ${describe(actual)}`);
  return Object.assign(err, { code: ErrorCode.INVALID_ARG_TYPE });
}

export function outOfRange(name: string, range: string, actual: unknown): RangeError {
  const err = new RangeError(`The value of "${name}" is out of range. It must be ${range}. Received ${describe(actual)}`);
  return Object.assign(err, { code: ErrorCode.OUT_OF_RANGE });
}

export function invalidArgValue(name: string, allowed: readonly string[], actual: unknown): TypeError {
  const err = new TypeError(`The "${name}" argument must be one of ${allowed.map((a) => `'${a}'`).join(', ')}. Received ${describe(actual)}`);
  return Object.assign(err, { code: ErrorCode.INVALID_ARG_VALUE });
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (typeof value === 'string') return `'${value.length > 40 ? value.slice(0, 40) + '...' : value}'`;
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') return `${typeof value} ${String(value)}`;
  if (typeof value === 'undefined') return 'undefined';
  if (typeof value === 'function') return 'function';
  return `an instance of ${(value as object).constructor?.name ?? 'Object'}`;
}
