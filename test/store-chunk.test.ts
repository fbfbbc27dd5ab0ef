// A store's chunk objects (docs/STORE.md, "Chunk object"), encoded and
// decoded with no store: compressible content goes as zstd, incompressible
// as it is, the older brotli layout still reads, and whatever is damaged or
// claims more than a chunk can hold is refused with ERR_STORE_CORRUPT before
// anything is allocated for it.
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { brotliCompressSync } from 'node:zlib';
import { CHUNK_HEADER_BYTES, Codec, MAX_CHUNK_BYTES, chunkHash, decodeChunk, encodeChunk } from '../lib/store/chunk.js';
import { TenantKey } from '../lib/store/tenant.js';
import { native } from '../lib/native.js';

/** 64 KiB of text-like pages: what most of a guest's memory compresses like. */
function textLike(): Buffer {
  const words = ['page', 'fault', 'kernel', 'memory', 'guest', 'snapshot', 'chunk', 'restore'];
  let s = '';
  for (let i = 0; s.length < 65536; i++) s += `${words[(i * 7) % words.length]} ${i} `;
  return Buffer.from(s.slice(0, 65536));
}

t.test('compressible content is stored as zstd, incompressible as it is; both decode to their content', async (t) => {
  t.ok(native.packingAvailable(), 'libzstd.so.1 is on this host');
  const text = textLike();
  const packed = await encodeChunk(text);
  t.equal(packed[1], Codec.zstd, 'codec byte: zstd');
  t.ok(packed.length < text.length / 4, `text-like 64 KiB in ${packed.length} bytes`);
  t.same(await decodeChunk(chunkHash(text), packed), text, 'decodes to the content');

  const random = randomBytes(65536);
  const raw = await encodeChunk(random);
  t.equal(raw[1], Codec.raw, 'random content is not worth compressing: raw');
  t.equal(raw.length, CHUNK_HEADER_BYTES + random.length);
  t.same(await decodeChunk(chunkHash(random), raw), random);
});

t.test('a chunk of the older layout (brotli) still decodes', async (t) => {
  const text = textLike();
  const header = Buffer.alloc(CHUNK_HEADER_BYTES);
  header[0] = 1;
  header[1] = Codec.brotli;
  header.writeUInt32LE(text.length, 4);
  const object = Buffer.concat([header, brotliCompressSync(text)]);
  t.same(await decodeChunk(chunkHash(text), object), text);
});

t.test('sealed with a tenant key: zstd under the seal, opened and decoded with the key only', async (t) => {
  const tenant = new TenantKey(randomBytes(32));
  const text = textLike();
  const hash = chunkHash(text);
  const sealed = await encodeChunk(text, tenant, hash);
  t.equal(sealed[1] & 0x7f, Codec.zstd, 'zstd, then sealed');
  t.notOk(sealed.includes(Buffer.from('snapshot')), 'no plaintext in the object');
  t.same(await decodeChunk(hash, sealed, tenant), text);
  await t.rejects(decodeChunk(hash, sealed), { code: 'ERR_STORE_DENIED' });
});

t.test('damaged, too long or lying chunks are refused with ERR_STORE_CORRUPT, naming the chunk', async (t) => {
  const text = textLike();
  const hash = chunkHash(text);
  const packed = await encodeChunk(text);

  const flipped = Buffer.from(packed);
  flipped[CHUNK_HEADER_BYTES + 20] ^= 0xff;
  await t.rejects(decodeChunk(hash, flipped), { code: 'ERR_STORE_CORRUPT', message: new RegExp(hash.slice(0, 16)) }, 'a flipped bit');

  const truncated = packed.subarray(0, packed.length - 10);
  await t.rejects(decodeChunk(hash, truncated), { code: 'ERR_STORE_CORRUPT', message: /does not decompress/ }, 'cut short');

  const shorter = Buffer.from(packed);
  shorter.writeUInt32LE(text.length - 4096, 4);
  await t.rejects(decodeChunk(hash, shorter), { code: 'ERR_STORE_CORRUPT', message: /does not decompress/ }, 'a header that says less than the frame holds');

  const huge = Buffer.from(packed);
  huge.writeUInt32LE(0xffffffff, 4);
  await t.rejects(decodeChunk(hash, huge), { code: 'ERR_STORE_CORRUPT', message: /more than a chunk can/ }, 'a header claiming 4 GiB');

  // A brotli body that expands past what its header says (a bomb) stops at the header's length.
  const bomb = Buffer.alloc(CHUNK_HEADER_BYTES);
  bomb[0] = 1;
  bomb[1] = Codec.brotli;
  bomb.writeUInt32LE(4096, 4);
  await t.rejects(decodeChunk(chunkHash(Buffer.alloc(4096)), Buffer.concat([bomb, brotliCompressSync(Buffer.alloc(MAX_CHUNK_BYTES))])), {
    code: 'ERR_STORE_CORRUPT',
  });

  const other = Buffer.from(text);
  other[100] ^= 1;
  await t.rejects(decodeChunk(hash, await encodeChunk(other)), { code: 'ERR_STORE_CORRUPT', message: /does not hash to its name/ }, 'content of another name');
});

t.test('the addon refuses what is not bytes or a length out of range (validated before any allocation)', async (t) => {
  t.throws(() => native.zstdPack('text' as unknown as Uint8Array), { code: 'ERR_INVALID_ARG_TYPE' });
  t.throws(() => native.zstdUnpack(Buffer.alloc(8), -1), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => native.zstdUnpack(Buffer.alloc(8), 2 ** 31), { code: 'ERR_OUT_OF_RANGE' });
  t.equal(native.zstdUnpack(Buffer.from('not a zstd frame'), 100), null, 'not a frame: null');
});
