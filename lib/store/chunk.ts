// A chunk: a fixed-size piece of one image region, named by the SHA-256 of
// its content, so identical pieces of any image are stored and moved once.
// As an object it is an 8-byte header and the content, compressed when that
// saves at least a tenth (docs/STORE.md has the layout): with zstd, in the
// addon and on this thread (tens of microseconds a chunk, less than a trip
// through libuv's pool, which a cold fault would wait for); chunks pushed
// before zstd was the codec are brotli, still read.
import { createHash } from 'node:crypto';
import { promisify } from 'node:util';
import { brotliCompress, brotliDecompress, constants as zlib } from 'node:zlib';
import { ErrorCode, PostcopyError } from '../errors.js';
import { native } from '../native.js';
import type { TenantKey } from './tenant.js';

export const CHUNK_HEADER_BYTES = 8;
const FORMAT = 1;
export const Codec = { raw: 0, brotli: 1, zstd: 2 } as const;

/** Default chunk size: see docs/STORE.md for the measurement behind it. */
export const DEFAULT_CHUNK_BYTES = 64 * 1024;
export const MAX_CHUNK_BYTES = 16 * 1024 * 1024;

/** A chunk size: a power of two from 4 KiB to 16 MiB. */
export function checkChunkBytes(n: number): number {
  if (!Number.isSafeInteger(n) || n < 4096 || n > MAX_CHUNK_BYTES || (n & (n - 1)) !== 0)
    throw new PostcopyError(ErrorCode.USAGE, `a chunk size is a power of two from 4 KiB to 16 MiB, not ${n}`);
  return n;
}

/** Chunks pushed where libzstd.so.1 is missing (never on Debian, whose libzstd1 is part of every install). */
const compress = promisify(brotliCompress);
const decompress = promisify(brotliDecompress);

export function chunkHash(plain: Uint8Array): string {
  return createHash('sha256').update(plain).digest('hex');
}

/** The object name of the chunk whose content hashes to `hash` (spread over 256 folders). */
export function chunkKey(hash: string): string {
  return `chunks/${hash.slice(0, 2)}/${hash}`;
}

export function isZero(bytes: Uint8Array): boolean {
  // Compared 8 bytes at a time where aligned.
  const words = bytes.byteOffset % 8 === 0 ? new BigUint64Array(bytes.buffer, bytes.byteOffset, bytes.length >> 3) : null;
  if (words) {
    for (let i = 0; i < words.length; i++) if (words[i] !== 0n) return false;
    for (let i = words.length * 8; i < bytes.length; i++) if (bytes[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** The codec byte's flag: the content is sealed with a tenant's key (lib/store/tenant.ts). */
const SEALED = 0x80;

/** The object for a chunk: compressed when that saves a tenth or more; sealed when a tenant's key is given. */
export async function encodeChunk(plain: Uint8Array, tenant?: TenantKey, hash?: string): Promise<Buffer> {
  let codec: number = Codec.raw;
  let body: Uint8Array = plain;
  if (native.packingAvailable()) {
    const packed = native.zstdPack(plain);
    if (packed && packed.length < plain.length * 0.9) [codec, body] = [Codec.zstd, packed];
  } else {
    const packed = await compress(plain, {
      params: { [zlib.BROTLI_PARAM_QUALITY]: 4, [zlib.BROTLI_PARAM_LGWIN]: 22, [zlib.BROTLI_PARAM_SIZE_HINT]: plain.length },
    });
    if (packed.length < plain.length * 0.9) [codec, body] = [Codec.brotli, packed];
  }
  const header = Buffer.alloc(CHUNK_HEADER_BYTES);
  header[0] = FORMAT;
  header[1] = codec | (tenant ? SEALED : 0);
  header.writeUInt32LE(plain.length, 4);
  return Buffer.concat([header, tenant ? tenant.sealChunk(hash ?? chunkHash(plain), body) : body]);
}

/** The content of a chunk object, checked against its name; ERR_STORE_CORRUPT when it is not what `hash` names. */
export async function decodeChunk(hash: string, object: Uint8Array, tenant?: TenantKey): Promise<Buffer> {
  const bad = (why: string) => new PostcopyError(ErrorCode.STORE_CORRUPT, `chunk ${hash.slice(0, 16)}: ${why}`, { chunk: hash });
  if (object.length < CHUNK_HEADER_BYTES || object[0] !== FORMAT) throw bad('not a chunk object (header)');
  const view = Buffer.from(object.buffer, object.byteOffset, object.length);
  const length = view.readUInt32LE(4);
  if (length > MAX_CHUNK_BYTES) throw bad(`says it holds ${length} bytes, more than a chunk can`);
  let body: Buffer = view.subarray(CHUNK_HEADER_BYTES);
  if (view[1] & SEALED) {
    if (!tenant)
      throw new PostcopyError(ErrorCode.STORE_DENIED, `chunk ${hash.slice(0, 16)} is sealed with a tenant's key: give the key (--tenant-key-file)`, {
        chunk: hash,
      });
    body =
      tenant.openChunk(hash, body) ??
      (() => {
        throw bad('does not open with the tenant key (damaged)');
      })();
  }
  const codec = view[1] & ~SEALED;
  let plain: Buffer;
  if (codec === Codec.raw) plain = body;
  else if (codec === Codec.zstd) {
    if (!native.packingAvailable())
      throw new PostcopyError(ErrorCode.UNSUPPORTED, `chunk ${hash.slice(0, 16)} is zstd and libzstd.so.1 is not on this host (apt-get install libzstd1)`, {
        chunk: hash,
      });
    const unpacked = native.zstdUnpack(body, length);
    if (!unpacked) throw bad('does not decompress');
    plain = unpacked;
  } else if (codec === Codec.brotli) plain = await decompress(body, { maxOutputLength: length }).catch(() => Promise.reject(bad('does not decompress')));
  else throw bad(`unknown codec ${codec}`);
  if (plain.length !== length) throw bad(`${plain.length} bytes, not ${length}`);
  if (chunkHash(plain) !== hash) throw bad('its content does not hash to its name');
  return plain;
}
