// A tenant's key: with it, the store never sees plaintext, and one tenant's
// identical chunks still deduplicate (docs/STORE.md, "Tenants"). Everything
// is derived from one secret with HMAC-SHA-256:
//   a chunk's object name   HMAC(secret, "name" || content hash)
//   its key and nonce       HMAC(secret, "key" || hash), HMAC(secret, "nonce" || hash)[0..12)
//   the manifests' key      HMAC(secret, "manifest")
// A chunk's key depends on its content only, so the same content under the
// same secret is the same object; sealed with AES-256-GCM, every object is
// authenticated as well as checked against its hash once opened.
import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ErrorCode, PostcopyError } from '../errors.js';

const TAG_BYTES = 16;
const NONCE_BYTES = 12;
/** A sealed manifest begins with these bytes (a plain one is JSON: '{'). */
const SEALED_MANIFEST = Buffer.from('PCM1');

export class TenantKey {
  readonly #secret: Buffer;

  constructor(secret: Uint8Array) {
    if (!(secret instanceof Uint8Array) || secret.length < 16) throw new PostcopyError(ErrorCode.USAGE, 'a tenant key is at least 16 bytes');
    this.#secret = Buffer.from(secret);
  }

  /** The secret in a file (its whole content, trailing newlines dropped), hashed to 32 bytes. */
  static fromFile(path: string): TenantKey {
    let text: Buffer;
    try {
      text = readFileSync(path);
    } catch (err) {
      throw new PostcopyError(ErrorCode.USAGE, `cannot read the tenant key file ${path}: ${(err as Error).message}`);
    }
    let end = text.length;
    while (end > 0 && (text[end - 1] === 0x0a || text[end - 1] === 0x0d)) end--;
    if (end < 16) throw new PostcopyError(ErrorCode.USAGE, `the tenant key file ${path} holds fewer than 16 bytes`);
    return new TenantKey(createHash('sha256').update(text.subarray(0, end)).digest());
  }

  #mac(label: string, hash = ''): Buffer {
    return createHmac('sha256', this.#secret).update(`uffd-postcopy ${label}\0${hash}`).digest();
  }

  /** The object name of the chunk whose content hashes to `hash`. */
  objectName(hash: string): string {
    return this.#mac('chunk name', hash).toString('hex');
  }

  sealChunk(hash: string, body: Uint8Array): Buffer {
    return seal(this.#mac('chunk key', hash), this.#mac('chunk nonce', hash).subarray(0, NONCE_BYTES), body);
  }

  /** Null when the object was not sealed with this key (or was damaged). */
  openChunk(hash: string, sealed: Uint8Array): Buffer | null {
    return open(this.#mac('chunk key', hash), this.#mac('chunk nonce', hash).subarray(0, NONCE_BYTES), sealed);
  }

  sealManifest(json: Uint8Array): Buffer {
    const nonce = randomBytes(NONCE_BYTES);
    return Buffer.concat([SEALED_MANIFEST, nonce, seal(this.#mac('manifest'), nonce, json)]);
  }

  openManifest(bytes: Uint8Array, where: string): Buffer {
    const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
    if (!isSealedManifest(b))
      throw new PostcopyError(ErrorCode.STORE_DENIED, `${where}: not sealed with a tenant key (pushed without one): give no tenant key for it`);
    const plain = open(this.#mac('manifest'), b.subarray(4, 4 + NONCE_BYTES), b.subarray(4 + NONCE_BYTES));
    if (!plain) throw new PostcopyError(ErrorCode.STORE_DENIED, `${where}: this tenant key does not open it (another tenant's, or damaged)`);
    return plain;
  }
}

export function isSealedManifest(bytes: Uint8Array): boolean {
  return bytes.length > 4 + NONCE_BYTES + TAG_BYTES && Buffer.from(bytes.buffer, bytes.byteOffset, 4).equals(SEALED_MANIFEST);
}

function seal(key: Buffer, nonce: Buffer, plain: Uint8Array): Buffer {
  const c = createCipheriv('aes-256-gcm', key, nonce);
  return Buffer.concat([c.update(plain), c.final(), c.getAuthTag()]);
}

function open(key: Buffer, nonce: Buffer, sealed: Uint8Array): Buffer | null {
  if (sealed.length < TAG_BYTES) return null;
  const body = Buffer.from(sealed.buffer, sealed.byteOffset, sealed.length);
  try {
    const d = createDecipheriv('aes-256-gcm', key, nonce);
    d.setAuthTag(body.subarray(body.length - TAG_BYTES));
    return Buffer.concat([d.update(body.subarray(0, body.length - TAG_BYTES)), d.final()]);
  } catch {
    return null;
  }
}
