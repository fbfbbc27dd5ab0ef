// Memory primitives: mappings with safe zero-copy views, memfd, madvise,
// hole punching and the data/hole extents of files.
import { fstatSync } from 'node:fs';
import { addonError, native, type NativeMapping } from './native.js';

type NativeAddonConstants = Record<string, number>;
import { ErrorCode, PostcopyError, invalidArgValue, outOfRange } from './errors.js';
import { validateAligned, validateBoolean, validateFd, validateInteger, validateOneOf, validateRange, validateString } from './validate.js';

// Read when first used: without the addon, importing this module still works (its functions then say the addon is not built).
let constants: NativeAddonConstants | null = null;
const c = new Proxy({} as NativeAddonConstants, { get: (_, name: string) => (constants ??= native.memoryConstants)[name] });
/** This machine's page size (4096 where the addon is not built: nothing here can run then). */
export const PAGE_SIZE: number = addonError ? 4096 : c.PAGE_SIZE;

/**
 * A mapped region. `buffer()` is a zero-copy view; after `unmap()` every view
 * handed out is detached (length 0), so stale views never touch freed memory.
 */
export class Mapping {
  readonly #native: NativeMapping;
  readonly address: number;
  readonly length: number;

  /** @internal use mapAnonymous / mapFile */
  constructor(nativeMapping: NativeMapping) {
    this.#native = nativeMapping;
    this.address = nativeMapping.address;
    this.length = nativeMapping.length;
  }

  get mapped(): boolean {
    return this.#native.mapped;
  }

  /** A Buffer over the whole mapping (or `[offset, offset+length)`), sharing its memory. */
  buffer(offset = 0, length = this.length - offset): Buffer {
    validateInteger(offset, 'offset');
    validateInteger(length, 'length');
    validateRange(offset, length, this.length, 'view');
    if (!this.mapped) throw new PostcopyError(ErrorCode.MAPPING_UNMAPPED, 'the mapping was unmapped');
    return Buffer.from(this.#native.view(), offset, length);
  }

  /** Unmaps now. Throws ERR_MAPPING_BUSY while a running session reads from it. */
  unmap(): void {
    this.#native.unmap();
  }

  /** The native object, for addon calls that pin the mapping while they use it. */
  get handle(): NativeMapping {
    return this.#native;
  }
}

export interface AnonymousOptions {
  /** MAP_SHARED instead of MAP_PRIVATE (default false). */
  shared?: boolean;
  /** Map exactly here (MAP_FIXED_NOREPLACE): fails rather than replacing a mapping. */
  address?: number;
  /** Populate page tables now (MAP_POPULATE). */
  populate?: boolean;
  /** Back with huge pages (MAP_HUGETLB). */
  hugetlb?: boolean;
  /** Skip swap reservation (MAP_NORESERVE). */
  noReserve?: boolean;
  /** Map read-only (default read-write). */
  readOnly?: boolean;
}

export function mapAnonymous(length: number, options: AnonymousOptions = {}): Mapping {
  validateAligned(length, 'length', PAGE_SIZE, PAGE_SIZE);
  const flags = c.MAP_ANONYMOUS | commonFlags(options);
  return new Mapping(new native.Mapping(length, protection(options.readOnly), flags, -1, 0, placement(options.address)));
}

export interface FileOptions extends Omit<AnonymousOptions, 'shared'> {
  /** Byte offset in the file (page-aligned). */
  offset?: number;
  /** MAP_SHARED (default true): writes reach the file and other mappers. */
  shared?: boolean;
  /** Allow a last page that the file covers only in part (it reads as zeros past the end). */
  allowPartialLastPage?: boolean;
}

/** Maps `length` bytes of the file behind `fd` (a regular file, tmpfs file or memfd). */
export function mapFile(fd: number, length: number, options: FileOptions = {}): Mapping {
  validateFd(fd);
  validateAligned(length, 'length', PAGE_SIZE, PAGE_SIZE);
  const offset = validateAligned(options.offset ?? 0, 'options.offset', PAGE_SIZE);
  // Touching a mapped page past the end of a file kills the process with
  // SIGBUS; refuse such a mapping up front instead.
  const stat = fstatSync(fd);
  const partial = options.allowPartialLastPage === true ? PAGE_SIZE - 1 : 0;
  if (stat.isFile() && offset + length > stat.size + partial) {
    throw outOfRange('offset + length', `<= the file size (${stat.size})`, offset + length);
  }
  const flags = commonFlags({ ...options, shared: options.shared ?? true });
  return new Mapping(new native.Mapping(length, protection(options.readOnly), flags, fd, offset, placement(options.address)));
}

function protection(readOnly: unknown): number {
  return readOnly !== undefined && validateBoolean(readOnly, 'options.readOnly') ? c.PROT_READ : c.PROT_READ | c.PROT_WRITE;
}

function placement(address: unknown): number {
  return address === undefined ? 0 : validateAligned(address, 'options.address', PAGE_SIZE, PAGE_SIZE);
}

function commonFlags(options: AnonymousOptions): number {
  const on = (v: unknown, name: string) => v !== undefined && validateBoolean(v, name);
  return (
    (on(options.shared, 'options.shared') ? c.MAP_SHARED : c.MAP_PRIVATE) |
    (options.address !== undefined ? c.MAP_FIXED_NOREPLACE : 0) |
    (on(options.populate, 'options.populate') ? c.MAP_POPULATE : 0) |
    (on(options.hugetlb, 'options.hugetlb') ? c.MAP_HUGETLB : 0) |
    (on(options.noReserve, 'options.noReserve') ? c.MAP_NORESERVE : 0)
  );
}

export interface MemfdOptions {
  closeOnExec?: boolean;
  allowSealing?: boolean;
  /** Back with huge pages; `hugePageShift` picks the size (e.g. 21 for 2 MiB). */
  hugetlb?: boolean;
  hugePageShift?: number;
}

export function memfdCreate(name: string, options: MemfdOptions = {}): number {
  validateString(name, 'name');
  if (Buffer.byteLength(name) > 249) throw invalidArgValue('name', ['at most 249 bytes'], name);
  let flags = 0;
  if (validateBoolean(options.closeOnExec ?? true, 'options.closeOnExec')) flags |= c.MFD_CLOEXEC;
  if (validateBoolean(options.allowSealing ?? false, 'options.allowSealing')) flags |= c.MFD_ALLOW_SEALING;
  if (validateBoolean(options.hugetlb ?? false, 'options.hugetlb')) {
    flags |= c.MFD_HUGETLB;
    if (options.hugePageShift !== undefined) flags |= validateInteger(options.hugePageShift, 'options.hugePageShift', 12, 63) << c.MFD_HUGE_SHIFT;
  }
  return native.memfdCreate(name, flags);
}

const sealBits = { seal: 'F_SEAL_SEAL', shrink: 'F_SEAL_SHRINK', grow: 'F_SEAL_GROW', write: 'F_SEAL_WRITE', 'future-write': 'F_SEAL_FUTURE_WRITE' } as const;
export type Seal = keyof typeof sealBits;
const sealNames = Object.keys(sealBits) as Seal[];

export function addSeals(fd: number, seals: readonly Seal[]): void {
  validateFd(fd);
  let mask = 0;
  for (const s of seals) mask |= c[sealBits[validateOneOf(s, 'seals', sealNames)]];
  native.addSeals(fd, mask);
}

export function getSeals(fd: number): Seal[] {
  const mask = native.getSeals(validateFd(fd));
  return sealNames.filter((s) => (mask & c[sealBits[s]]) !== 0);
}

const adviceValues = {
  dontneed: 'MADV_DONTNEED',
  remove: 'MADV_REMOVE',
  hugepage: 'MADV_HUGEPAGE',
  nohugepage: 'MADV_NOHUGEPAGE',
  'populate-read': 'MADV_POPULATE_READ',
  'populate-write': 'MADV_POPULATE_WRITE',
} as const;
export type Advice = keyof typeof adviceValues;

/** madvise over `[offset, offset+length)` of a mapping. */
export function madvise(mapping: Mapping, offset: number, length: number, advice: Advice): void {
  if (!(mapping instanceof Mapping)) throw invalidArgValue('mapping', ['a Mapping'], mapping);
  validateAligned(offset, 'offset', PAGE_SIZE);
  validateAligned(length, 'length', PAGE_SIZE, PAGE_SIZE);
  validateRange(offset, length, mapping.length, 'madvise');
  const value = c[adviceValues[validateOneOf(advice, 'advice', Object.keys(adviceValues) as Advice[])]];
  if (!mapping.mapped) throw new PostcopyError(ErrorCode.MAPPING_UNMAPPED, 'the mapping was unmapped');
  native.madvise(mapping.address + offset, length, value);
}

/** Frees the file's blocks in the range, leaving a hole that reads as zeros; the size is kept. */
export function punchHole(fd: number, offset: number, length: number): void {
  validateFd(fd);
  validateInteger(offset, 'offset');
  validateInteger(length, 'length', 1);
  native.fallocate(fd, c.FALLOC_FL_PUNCH_HOLE | c.FALLOC_FL_KEEP_SIZE, offset, length);
}

export interface Extent {
  offset: number;
  length: number;
  /** false for a hole (reads as zeros, holds no blocks). */
  data: boolean;
}

/** The data and hole extents of a file, in order, covering [0, size). */
export function fileExtents(fd: number, size: number = fstatSync(validateFd(fd)).size): Extent[] {
  validateFd(fd);
  validateInteger(size, 'size');
  const flat = native.fileExtents(fd, size);
  const out: Extent[] = [];
  for (let i = 0; i < flat.length; i += 3) out.push({ offset: flat[i], length: flat[i + 1], data: flat[i + 2] === 1 });
  return out;
}
