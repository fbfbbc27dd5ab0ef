// The host's chunk cache: one directory shared by every restore on this host
// (any process), so a chunk is fetched from the store once per host. Each
// chunk is a file named by its hash (checked when it came from the store),
// made nameless and linked to its name once whole (a crash mid-write leaves
// no half chunk under a real name, and no reader sees one). The file is the content and a footer (the magic
// "uffdpcc1" and a 64-bit check of the content, addon/chunk_cache.h), checked
// on every read: here, and by a restore's fault thread, which reads the cache
// itself. A miss locks the chunk's slot in the directory's lock file (an
// open file description lock, which the kernel lets go with its holder), so
// that concurrent misses on one chunk, in any process, make one request; the
// others wait (bounded) for the file. The directory is bounded: past its size
// the chunks used least recently (file times, touched on each hit) go first.
import { constants as fsConstants, mkdirSync, openSync, readFileSync, readSync, statSync, writeSync } from 'node:fs';
import { readdir, stat, unlink, utimes } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, PostcopyError } from '../errors.js';
import { silentLogger, type Logger } from '../logger.js';
import { native } from '../native.js';

export const DEFAULT_CACHE_BYTES = 4 * 1024 ** 3;
/**
 * A lock is a lease: its holder writes the time into its slot every
 * LOCK_BEAT_MS while it fetches, so a fetch that takes long (a store out of
 * reach, a host under load) is waited for, and one whose holder hung (held
 * for LOCK_STALE_MS as seen by the waiter, with no beat for as long) is
 * fetched here too. A holder that died let go of its lock with its last
 * breath (the kernel's doing). LOCK_WAIT_MS bounds a wait in any case.
 */
const LOCK_BEAT_MS = 2_000;
const LOCK_STALE_MS = 15_000;
const LOCK_WAIT_MS = 5 * 60_000;
/** The lock file's slots: 8 bytes each (the holder's last beat, ms since the epoch, f64 LE). Two chunks may share one: one then waits for the other's fetch. */
const LOCK_SLOTS = 1 << 20;
/** A chunk file under a temporary name this old was left by a crash (one is written in milliseconds). */
const LEFT_BY_A_CRASH_MS = 10 * 60_000;
const SLOT_BYTES = 8;

/** The byte offset of the chunk's slot in the cache directory's lock file (`lock`). */
export function lockSlotOffset(hash: string): number {
  return (parseInt(hash.slice(0, 8), 16) % LOCK_SLOTS) * SLOT_BYTES;
}

/**
 * Per cache directory, in this process: its lock file, opened once (one
 * open file description: its locks do not exclude each other, so the slots
 * this process holds are counted here), and the chunks being fetched, until
 * they are kept (every ChunkCache on the directory joins them).
 */
interface CacheHost {
  lockFd: number;
  /** Chunk slots this process holds, and how many of its fetches hold each: locked at the first, unlocked after the last. */
  slots: Map<number, number>;
  inFlight: Map<string, { owner: ChunkCache; content: Promise<Buffer> }>;
}
const hosts = new Map<string, CacheHost>();
const MAGIC = Buffer.from('uffdpcc1');
const FOOTER_BYTES = 16;

/** A chunk file's content, or null when its footer does not match it. */
function withoutFooter(file: Buffer): Buffer | null {
  if (file.length < FOOTER_BYTES) return null;
  const plain = file.subarray(0, file.length - FOOTER_BYTES);
  const footer = file.subarray(file.length - FOOTER_BYTES);
  return footer.subarray(0, 8).equals(MAGIC) && footer.readBigUInt64LE(8) === native.cacheCheck(plain) ? plain : null;
}

export interface ChunkCacheOptions {
  /** Default: $POSTCOPY_CHUNK_CACHE, else /var/cache/uffd-postcopy/chunks as root, else ~/.cache/uffd-postcopy/chunks. */
  dir?: string;
  /** Bytes kept at most (default 4 GiB). */
  maxBytes?: number;
  /** How long a chunk's lock may be held with no beat before its holder counts as hung (default 15 s). */
  staleLockMs?: number;
  logger?: Logger;
}

export interface ChunkCacheStats {
  hits: number;
  misses: number;
  /** Misses another process (or request here) was fetching already: waited for, not fetched again. */
  joined: number;
  /** Chunk files found damaged (their check fails, or a layout of an older version): removed and fetched again. */
  damaged: number;
  evicted: number;
}

export function defaultCacheDir(): string {
  if (process.env.POSTCOPY_CHUNK_CACHE) return process.env.POSTCOPY_CHUNK_CACHE;
  if (process.getuid?.() === 0) return '/var/cache/uffd-postcopy/chunks';
  return join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'uffd-postcopy', 'chunks');
}

export class ChunkCache {
  readonly dir: string;
  readonly maxBytes: number;
  readonly stats: ChunkCacheStats = { hits: 0, misses: 0, joined: 0, damaged: 0, evicted: 0 };
  readonly #log: Logger;
  readonly #host: CacheHost;
  readonly #staleLockMs: number;
  /** Bytes in the directory as this process last counted them (null until first counted). */
  #bytes: number | null = null;
  #evicting: Promise<void> | null = null;
  #counting: Promise<void> | null = null;
  /** Chunks being written to the cache (after their fetch was answered). */
  readonly #keeping = new Set<Promise<unknown>>();

  constructor(options: ChunkCacheOptions = {}) {
    this.dir = options.dir ?? defaultCacheDir();
    this.maxBytes = options.maxBytes ?? DEFAULT_CACHE_BYTES;
    if (!Number.isSafeInteger(this.maxBytes) || this.maxBytes < 1 << 20)
      throw new PostcopyError(ErrorCode.USAGE, `a chunk cache holds at least 1 MiB, not ${this.maxBytes} bytes`);
    this.#log = options.logger ?? silentLogger;
    this.#staleLockMs = options.staleLockMs ?? LOCK_STALE_MS;
    if (!Number.isSafeInteger(this.#staleLockMs) || this.#staleLockMs < 2 * LOCK_BEAT_MS)
      throw new PostcopyError(ErrorCode.USAGE, `staleLockMs is a whole number of milliseconds of at least ${2 * LOCK_BEAT_MS}, not ${this.#staleLockMs}`);
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const key = resolve(this.dir);
    let host = hosts.get(key);
    if (!host) {
      host = {
        lockFd: openSync(join(this.dir, 'lock'), fsConstants.O_RDWR | fsConstants.O_CREAT, 0o600),
        slots: new Map(),
        inFlight: new Map(),
      };
      hosts.set(key, host);
    }
    this.#host = host;
  }

  #path(hash: string): string {
    return join(this.dir, hash.slice(0, 2), hash);
  }

  /**
   * The chunk's content: from the cache, or from `fetch` (once per host at a
   * time), then kept. A fetch under way for another cache on the directory
   * in this process is joined; if it fails (its store, its tenant key), this
   * one fetches for itself.
   */
  get(hash: string, fetch: () => Promise<Buffer>): Promise<Buffer> {
    const inFlight = this.#host.inFlight;
    const under = inFlight.get(hash);
    if (under) {
      this.stats.joined++;
      if (under.owner === this) return under.content;
      return under.content.catch(() => {
        if (inFlight.get(hash) === under) inFlight.delete(hash);
        return this.get(hash, fetch);
      });
    }
    let kept: Promise<void> = Promise.resolve();
    const content = this.#get(hash, fetch, (keeping) => (kept = keeping));
    const entry = { owner: this, content };
    inFlight.set(hash, entry);
    // Held until the chunk is kept, so that a second want of it in this process waits for the file rather than fetching again.
    void content
      .then(
        () => kept,
        () => {},
      )
      .finally(() => {
        if (inFlight.get(hash) === entry) inFlight.delete(hash);
      });
    return content;
  }

  async #get(hash: string, fetch: () => Promise<Buffer>, keeping: (p: Promise<void>) => void): Promise<Buffer> {
    const kept = await this.#read(hash);
    if (kept) {
      this.stats.hits++;
      return kept;
    }
    const deadline = Date.now() + LOCK_WAIT_MS;
    let heldSince = 0; // when this process first found the chunk's lock held by another
    for (let wait = 2; ; wait = Math.min(50, wait * 2)) {
      const release = this.#lock(hash);
      if (release) {
        let plain: Buffer;
        try {
          // Whoever held the lock before may have kept the chunk since this process looked.
          const theirs = await this.#read(hash);
          if (theirs) {
            release();
            this.stats.joined++;
            return theirs;
          }
          this.stats.misses++;
          plain = await fetch();
        } catch (err) {
          release();
          throw err;
        }
        // The check of the content as fetched, taken now: a caller that writes into the buffer meanwhile spoils only its own copy.
        const kept = this.#keep(hash, plain, native.cacheCheck(plain)).finally(release);
        keeping(kept);
        this.#keeping.add(kept);
        void kept.finally(() => this.#keeping.delete(kept));
        return plain;
      }
      // Another process fetches it: its file appears once it is written.
      await sleep(wait);
      const theirs = await this.#read(hash);
      if (theirs) {
        this.stats.joined++;
        return theirs;
      }
      heldSince ||= Date.now();
      if (Date.now() - heldSince > this.#staleLockMs && this.#holderHung(hash)) {
        this.#log.warn({ chunk: hash, staleMs: this.#staleLockMs }, 'the process fetching a chunk stopped beating (hung): fetching it here');
        this.stats.misses++;
        return fetch();
      }
      if (Date.now() > deadline) {
        this.#log.warn({ chunk: hash, waitedMs: LOCK_WAIT_MS }, 'another process held the fetch of a chunk too long: fetching it here');
        this.stats.misses++;
        return fetch();
      }
    }
  }

  /**
   * The chunk's file, checked; null when there is none (or it was damaged:
   * then removed). Read on this thread: a file of one chunk from the page
   * cache costs less than a trip through libuv's pool, which the fetches'
   * decompression keeps busy, and a fault may be waiting for it.
   */
  async #read(hash: string): Promise<Buffer | null> {
    const path = this.#path(hash);
    let bytes: Buffer | null;
    // A miss is asked without an exception (an error made for a missing file costs tens of microseconds).
    try {
      if (!statSync(path, { throwIfNoEntry: false })) return null;
      bytes = withoutFooter(readFileSync(path));
    } catch {
      return null;
    }
    if (!bytes) {
      // One warning per cache (a cache written by an older layout, or a disk that went bad, has many such files), the rest at debug.
      this.#log[this.stats.damaged++ === 0 ? 'warn' : 'debug'](
        { chunk: hash, path },
        'a cached chunk is damaged (or of an older layout): removed, fetched again; any more are logged at debug level',
      );
      await unlink(path).catch(() => {});
      return null;
    }
    const now = new Date();
    void utimes(path, now, now).catch(() => {}); // used now: the last to be evicted
    return bytes;
  }

  /**
   * Locks the chunk's slot (on this thread: one fcntl, no file made); the
   * function that lets it go, or null while another process holds it. The
   * first beat comes after LOCK_BEAT_MS: a fetch shorter than that writes
   * none (a write into a page under writeback waits for the disk).
   */
  #lock(hash: string): (() => void) | null {
    const host = this.#host;
    const at = lockSlotOffset(hash);
    const held = host.slots.get(at) ?? 0;
    if (held === 0) {
      let got: boolean;
      try {
        got = native.rangeLock(host.lockFd, at, SLOT_BYTES, true);
      } catch (err) {
        // A filesystem without these locks (or out of them): this process fetches unlocked, which costs only a second request.
        this.#log.warn({ dir: this.dir, err: (err as Error).message }, 'the chunk cache cannot lock: fetching without the lock');
        return () => {};
      }
      if (!got) return null;
    }
    host.slots.set(at, held + 1);
    const beat = () => {
      const now = Buffer.alloc(SLOT_BYTES);
      now.writeDoubleLE(Date.now());
      try {
        writeSync(host.lockFd, now, 0, SLOT_BYTES, at);
      } catch {
        // A full disk: waiters then see an old beat and fetch for themselves, which is only slower.
      }
    };
    const timer = setInterval(beat, LOCK_BEAT_MS);
    timer.unref();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      clearInterval(timer);
      const left = (host.slots.get(at) ?? 1) - 1;
      if (left > 0) {
        host.slots.set(at, left);
        return;
      }
      host.slots.delete(at);
      try {
        native.rangeLock(host.lockFd, at, SLOT_BYTES, false);
      } catch (err) {
        this.#log.warn({ dir: this.dir, err: (err as Error).message }, 'the chunk cache could not unlock a slot');
      }
    };
  }

  /** The chunk's holder has not beaten for the stale time (or never did): it hung. */
  #holderHung(hash: string): boolean {
    // No beat at all (the slot past the file's end, or never written) reads as the epoch: a holder that never beat.
    const last = Buffer.alloc(SLOT_BYTES);
    try {
      readSync(this.#host.lockFd, last, 0, SLOT_BYTES, lockSlotOffset(hash));
    } catch {
      return true;
    }
    return Date.now() - last.readDoubleLE() > this.#staleLockMs;
  }

  /**
   * Writes the chunk's file (addon/chunk_cache.cc, KeepWorker: made nameless
   * and linked to its name once whole, in one trip through libuv's pool);
   * begun on the loop's next turn, so the fetch's own caller (a fault
   * waiting for its page) goes first.
   */
  async #keep(hash: string, plain: Buffer, check: bigint): Promise<void> {
    await new Promise((r) => setImmediate(r));
    try {
      await this.#count();
      const made = await native.cacheKeep(join(this.dir, hash.slice(0, 2)), hash, plain, check);
      if (!made) return;
      this.#bytes! += plain.length + FOOTER_BYTES;
      if (this.#bytes! > this.maxBytes) await (this.#evicting ??= this.#evict().finally(() => (this.#evicting = null)));
    } catch (err) {
      this.#log.warn({ chunk: hash, err: (err as Error).message }, 'a chunk could not be kept in the cache');
    }
  }

  /** Bytes kept in the directory by another writer of this process (a restore's engine): counted against the bound. */
  keptElsewhere(bytes: number): void {
    if (this.#bytes === null) return; // the first count will see them
    this.#bytes += bytes;
    if (this.#bytes > this.maxBytes && !this.#evicting)
      this.#evicting = this.#evict()
        .catch((err) => this.#log.warn({ dir: this.dir, err: (err as Error).message }, 'the chunk cache could not be trimmed'))
        .finally(() => (this.#evicting = null));
  }

  /** Every chunk file with its size and last use. */
  async #files(): Promise<{ path: string; size: number; used: number }[]> {
    const out: { path: string; size: number; used: number }[] = [];
    for (const sub of await readdir(this.dir)) {
      if (sub === 'tmp') await this.#sweepOldTmp();
      if (sub.length !== 2) continue;
      for (const name of await readdir(join(this.dir, sub)).catch(() => [] as string[])) {
        const path = join(this.dir, sub, name);
        const st = await stat(path).catch(() => null);
        if (!st) continue;
        // A temporary name (a filesystem without nameless files): being written, or left by a crash (then removed).
        if (name.startsWith('.tmp.')) {
          if (Date.now() - st.mtimeMs > LEFT_BY_A_CRASH_MS) await unlink(path).catch(() => {});
          continue;
        }
        out.push({ path, size: st.size, used: st.mtimeMs });
      }
    }
    return out;
  }

  /** `tmp/`, where versions before nameless files wrote: what a crash left there, once old (one may still write there now). */
  async #sweepOldTmp(): Promise<void> {
    const tmp = join(this.dir, 'tmp');
    for (const name of await readdir(tmp).catch(() => [] as string[])) {
      const st = await stat(join(tmp, name)).catch(() => null);
      if (st && Date.now() - st.mtimeMs > LEFT_BY_A_CRASH_MS) await unlink(join(tmp, name)).catch(() => {});
    }
  }

  /** Counts the directory's bytes once: every chunk kept meanwhile waits for the one count (a scan of the whole directory). */
  #count(): Promise<void> {
    if (this.#bytes !== null) return Promise.resolve();
    return (this.#counting ??= this.#files().then(
      (files) => {
        this.#bytes = files.reduce((n, f) => n + f.size, 0);
      },
      (err) => {
        this.#counting = null;
        throw err;
      },
    ));
  }

  /** Down to nine tenths of the bound, least recently used first (what other processes added counts too). */
  async #evict(): Promise<void> {
    const files = (await this.#files()).sort((a, b) => a.used - b.used);
    let bytes = files.reduce((n, f) => n + f.size, 0);
    let evicted = 0;
    for (const f of files) {
      if (bytes <= this.maxBytes * 0.9) break;
      await unlink(f.path).catch(() => {});
      bytes -= f.size;
      evicted++;
    }
    this.#bytes = bytes;
    this.stats.evicted += evicted;
    this.#log.info({ dir: this.dir, evicted, bytes, maxBytes: this.maxBytes }, 'chunk cache trimmed');
  }

  /** Resolves once every chunk fetched so far is written to the cache (and its lock let go). */
  async settled(): Promise<void> {
    while (this.#keeping.size) await Promise.allSettled([...this.#keeping]);
  }

  /** Bytes of chunks in the directory now. */
  async size(): Promise<number> {
    return (await this.#files()).reduce((n, f) => n + f.size, 0);
  }
}
