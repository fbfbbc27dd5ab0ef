// Userfaultfd: a typed, validated front door over the addon's ioctls.
import { closeSync } from 'node:fs';
import { PAGE_SIZE } from './memory.js';
import { native, type Progress, type RawEvent } from './native.js';
import { ErrorCode, PostcopyError, invalidArgValue } from './errors.js';
import { validateAligned, validateBoolean, validateBytes, validateFd, validateInteger, validateRange } from './validate.js';

export type { Progress } from './native.js';
export { PAGE_SIZE };

/** Feature bits of UFFDIO_API, by name (the kernel's UFFD_FEATURE_*). */
export const Feature = {
  PAGEFAULT_FLAG_WP: 1 << 0,
  EVENT_FORK: 1 << 1,
  EVENT_REMAP: 1 << 2,
  EVENT_REMOVE: 1 << 3,
  MISSING_HUGETLBFS: 1 << 4,
  MISSING_SHMEM: 1 << 5,
  EVENT_UNMAP: 1 << 6,
  SIGBUS: 1 << 7,
  THREAD_ID: 1 << 8,
  MINOR_HUGETLBFS: 1 << 9,
  MINOR_SHMEM: 1 << 10,
  EXACT_ADDRESS: 1 << 11,
  WP_HUGETLBFS_SHMEM: 1 << 12,
  WP_UNPOPULATED: 1 << 13,
  POISON: 1 << 14,
  WP_ASYNC: 1 << 15,
  MOVE: 1 << 16,
} as const;
export type FeatureName = keyof typeof Feature;
const featureNames = Object.keys(Feature) as FeatureName[];

/** ioctl numbers (bit positions in the ioctls masks the kernel reports). */
export const Ioctl = {
  REGISTER: 0x00,
  UNREGISTER: 0x01,
  WAKE: 0x02,
  COPY: 0x03,
  ZEROPAGE: 0x04,
  MOVE: 0x05,
  WRITEPROTECT: 0x06,
  CONTINUE: 0x07,
  POISON: 0x08,
  API: 0x3f,
} as const;
export type IoctlName = keyof typeof Ioctl;

export type RegisterMode = 'missing' | 'wp' | 'minor';
const registerModeBits: Record<RegisterMode, number> = { missing: 1, wp: 2, minor: 4 };

const MODE_DONTWAKE = 1;
const MODE_WP = 2; // COPY_MODE_WP and CONTINUE_MODE_WP share the bit
const MOVE_ALLOW_SRC_HOLES = 2;
const WRITEPROTECT_MODE_WP = 1;
const WRITEPROTECT_MODE_DONTWAKE = 2;
const PAGEFAULT_FLAG_WRITE = 1;
const PAGEFAULT_FLAG_WP = 2;
const PAGEFAULT_FLAG_MINOR = 4;

export type UffdEvent =
  | { type: 'pagefault'; address: number; write: boolean; wp: boolean; minor: boolean; threadId: number }
  | { type: 'fork'; fd: number }
  | { type: 'remap'; from: number; to: number; length: number }
  | { type: 'remove'; start: number; end: number }
  | { type: 'unmap'; start: number; end: number }
  | { type: 'unknown'; event: number };

export interface OpenOptions {
  /** read() of events returns at once when none are pending (default false). */
  nonBlocking?: boolean;
  /** The fd is closed in exec'd children (default true). */
  closeOnExec?: boolean;
}

export interface Handshake {
  /** The features requested and granted. */
  features: FeatureName[];
  /** Every feature this kernel offers. */
  available: FeatureName[];
  /** ioctls usable on the fd itself. */
  ioctls: IoctlName[];
}

export function featuresFromMask(mask: number): FeatureName[] {
  return featureNames.filter((name) => (mask & Feature[name]) !== 0);
}

export function ioctlsFromMask(mask: bigint): IoctlName[] {
  return (Object.keys(Ioctl) as IoctlName[]).filter((name) => (mask >> BigInt(Ioctl[name])) & 1n);
}

function featureMask(names: readonly string[]): number {
  let mask = 0;
  for (const name of names) {
    if (!(name in Feature)) throw invalidArgValue('features', featureNames, name);
    mask |= Feature[name as FeatureName];
  }
  return mask;
}

/** Features this kernel offers, probed on a throwaway userfaultfd. */
export function availableFeatures(): FeatureName[] {
  const probe = Userfaultfd.open();
  try {
    return probe.handshake([]).available;
  } finally {
    probe.close();
  }
}

export class Userfaultfd {
  #fd: number;
  /** How the fd was obtained: the syscall, /dev/userfaultfd, the user-mode-only syscall, or 'received'. */
  readonly openedVia: string;

  private constructor(fd: number, openedVia: string) {
    this.#fd = fd;
    this.openedVia = openedVia;
  }

  /**
   * Opens a userfaultfd: the syscall first, then /dev/userfaultfd, then the
   * user-mode-only syscall an unprivileged process may still use.
   */
  static open(options: OpenOptions = {}): Userfaultfd {
    const nonBlocking = validateBoolean(options.nonBlocking ?? false, 'options.nonBlocking');
    const closeOnExec = validateBoolean(options.closeOnExec ?? true, 'options.closeOnExec');
    const c = native.uffdConstants;
    const flags = (nonBlocking ? c.O_NONBLOCK : 0) | (closeOnExec ? c.O_CLOEXEC : 0);
    try {
      const { fd, via } = native.uffdOpen(flags);
      return new Userfaultfd(fd, via);
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      throw new PostcopyError(
        ErrorCode.UFFD_UNAVAILABLE,
        `cannot open a userfaultfd (${e.code}): the syscall, /dev/userfaultfd and user-mode-only were all refused; ` +
          'run as root, grant access to /dev/userfaultfd, or set sysctl vm.unprivileged_userfaultfd=1',
        { errno: e.errno, syscall: e.syscall },
      );
    }
  }

  /** Adopts a userfaultfd made elsewhere (e.g. received over a unix socket). */
  static fromFd(fd: number): Userfaultfd {
    return new Userfaultfd(validateFd(fd), 'received');
  }

  get fd(): number {
    if (this.#fd < 0) throw new PostcopyError(ErrorCode.UFFD_CLOSED, 'the userfaultfd is closed');
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** UFFDIO_API: enables the named features (all must be granted, or EINVAL). Once per fd. */
  handshake(features: readonly FeatureName[] = []): Handshake {
    if (!Array.isArray(features)) throw invalidArgValue('features', featureNames, features);
    const mask = featureMask(features);
    const { available, ioctls } = native.uffdApi(this.fd, mask);
    return { features: featuresFromMask(mask), available: featuresFromMask(available), ioctls: ioctlsFromMask(ioctls) };
  }

  /** UFFDIO_REGISTER: returns the ioctls allowed on the range. */
  register(address: number, length: number, modes: readonly RegisterMode[] = ['missing']): IoctlName[] {
    checkRange(address, length);
    if (!Array.isArray(modes) || modes.length === 0) throw invalidArgValue('modes', Object.keys(registerModeBits), modes);
    let mode = 0;
    for (const m of modes) {
      if (!(m in registerModeBits)) throw invalidArgValue('modes', Object.keys(registerModeBits), m);
      mode |= registerModeBits[m as RegisterMode];
    }
    return ioctlsFromMask(native.uffdRegister(this.fd, address, length, mode));
  }

  unregister(address: number, length: number): void {
    checkRange(address, length);
    native.uffdUnregister(this.fd, address, length);
  }

  /** UFFDIO_COPY from `source[sourceOffset, +length)` to `address`. */
  copy(address: number, source: Uint8Array, options: { sourceOffset?: number; length?: number; dontWake?: boolean; writeProtect?: boolean } = {}): Progress {
    validateBytes(source, 'source');
    const sourceOffset = validateInteger(options.sourceOffset ?? 0, 'options.sourceOffset');
    const length = options.length ?? source.byteLength - sourceOffset;
    checkRange(address, length);
    validateRange(sourceOffset, length, source.byteLength, 'source');
    const mode = (flag(options.dontWake, 'options.dontWake') ? MODE_DONTWAKE : 0) | (flag(options.writeProtect, 'options.writeProtect') ? MODE_WP : 0);
    return native.uffdCopy(this.fd, address, source, sourceOffset, length, mode);
  }

  /** UFFDIO_ZEROPAGE: maps zero pages, no data. */
  zeroPage(address: number, length: number, options: { dontWake?: boolean } = {}): Progress {
    checkRange(address, length);
    return native.uffdZeroPage(this.fd, address, length, flag(options.dontWake, 'options.dontWake') ? MODE_DONTWAKE : 0);
  }

  /** UFFDIO_CONTINUE: maps the page-cache pages already present (MINOR faults). */
  continue(address: number, length: number, options: { dontWake?: boolean; writeProtect?: boolean } = {}): Progress {
    checkRange(address, length);
    const mode = (flag(options.dontWake, 'options.dontWake') ? MODE_DONTWAKE : 0) | (flag(options.writeProtect, 'options.writeProtect') ? MODE_WP : 0);
    return native.uffdContinue(this.fd, address, length, mode);
  }

  /** UFFDIO_POISON: later accesses to the range get SIGBUS. */
  poison(address: number, length: number, options: { dontWake?: boolean } = {}): Progress {
    checkRange(address, length);
    return native.uffdPoison(this.fd, address, length, flag(options.dontWake, 'options.dontWake') ? MODE_DONTWAKE : 0);
  }

  /** UFFDIO_MOVE: moves pages from `source` (an address in this process) to `address`, no copy. */
  move(address: number, source: number, length: number, options: { dontWake?: boolean; allowSourceHoles?: boolean } = {}): Progress {
    checkRange(address, length);
    validateAligned(source, 'source', PAGE_SIZE);
    const mode =
      (flag(options.dontWake, 'options.dontWake') ? MODE_DONTWAKE : 0) |
      (flag(options.allowSourceHoles, 'options.allowSourceHoles') ? MOVE_ALLOW_SRC_HOLES : 0);
    return native.uffdMove(this.fd, address, source, length, mode);
  }

  /** UFFDIO_WAKE: wakes threads waiting on faults in the range. */
  wake(address: number, length: number): void {
    checkRange(address, length);
    native.uffdWake(this.fd, address, length);
  }

  /** UFFDIO_WRITEPROTECT: protect (true) or un-protect (false) the range. */
  writeProtect(address: number, length: number, protect: boolean, options: { dontWake?: boolean } = {}): void {
    checkRange(address, length);
    const mode =
      (validateBoolean(protect, 'protect') ? WRITEPROTECT_MODE_WP : 0) | (flag(options.dontWake, 'options.dontWake') ? WRITEPROTECT_MODE_DONTWAKE : 0);
    native.uffdWriteProtect(this.fd, address, length, mode);
  }

  /** Reads up to `max` pending events in one read(); [] when non-blocking and none are pending. */
  readEvents(max = 64): UffdEvent[] {
    validateInteger(max, 'max', 1, 4096);
    return native.uffdReadEvents(this.fd, max).map(toEvent);
  }

  /** Resolves true when events are pending, false after `timeoutMs` (-1: wait forever). */
  async waitReadable(timeoutMs = -1): Promise<boolean> {
    validateInteger(timeoutMs, 'timeoutMs', -1, 0x7fffffff);
    const revents = await native.pollFd(this.fd, native.pollConstants.POLLIN, timeoutMs);
    return (revents & native.pollConstants.POLLIN) !== 0;
  }

  /** Gives up ownership of the fd (e.g. to a native engine) without closing it. */
  release(): number {
    const fd = this.fd;
    this.#fd = -1;
    return fd;
  }

  close(): void {
    if (this.#fd >= 0) closeSync(this.#fd);
    this.#fd = -1;
  }
}

function checkRange(address: number, length: number): void {
  validateAligned(address, 'address', PAGE_SIZE);
  validateAligned(length, 'length', PAGE_SIZE, PAGE_SIZE);
}

function flag(value: unknown, name: string): boolean {
  return value === undefined ? false : validateBoolean(value, name);
}

function toEvent(raw: RawEvent): UffdEvent {
  switch (raw.type) {
    case 'pagefault': {
      const flags = raw.flags!;
      return {
        type: 'pagefault',
        address: raw.address!,
        write: (flags & PAGEFAULT_FLAG_WRITE) !== 0,
        wp: (flags & PAGEFAULT_FLAG_WP) !== 0,
        minor: (flags & PAGEFAULT_FLAG_MINOR) !== 0,
        threadId: raw.threadId!,
      };
    }
    case 'fork':
      return { type: 'fork', fd: raw.fd! };
    case 'remap':
      return { type: 'remap', from: raw.from!, to: raw.to!, length: raw.length! };
    case 'remove':
    case 'unmap':
      return { type: raw.type, start: raw.start!, end: raw.end! };
    default:
      return { type: 'unknown', event: raw.event! };
  }
}
