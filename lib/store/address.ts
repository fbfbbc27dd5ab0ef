// Where a snapshot store lives: s3://BUCKET/PREFIX, and an image in it:
// s3://BUCKET/PREFIX/NAME (docs/STORE.md).
import { ErrorCode, PostcopyError } from '../errors.js';

export interface StoreAddress {
  bucket: string;
  /** The store's folder in the bucket, without slashes at either end ('' for the bucket's root). */
  prefix: string;
}

export interface ImageAddress extends StoreAddress {
  name: string;
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

export function isStoreUrl(text: string): boolean {
  return text.startsWith('s3://');
}

/** s3://BUCKET[/PREFIX]: a store. */
export function parseStoreUrl(text: string): StoreAddress {
  if (!isStoreUrl(text)) throw new PostcopyError(ErrorCode.INVALID_ADDRESS, `${text}: a store is s3://BUCKET[/PREFIX]`);
  const [bucket, ...rest] = text.slice(5).split('/');
  if (!BUCKET.test(bucket)) throw new PostcopyError(ErrorCode.INVALID_ADDRESS, `${text}: "${bucket}" is not a bucket name (3-63 of a-z 0-9 . -)`);
  const prefix = rest.filter((part) => part !== '').join('/');
  return { bucket, prefix };
}

/** s3://BUCKET[/PREFIX]/NAME: an image in a store. */
export function parseImageUrl(text: string): ImageAddress {
  const store = parseStoreUrl(text);
  const parts = store.prefix.split('/');
  const name = parts.pop() ?? '';
  if (!name) throw new PostcopyError(ErrorCode.INVALID_ADDRESS, `${text}: an image in a store is s3://BUCKET[/PREFIX]/NAME`);
  checkImageName(name);
  return { bucket: store.bucket, prefix: parts.join('/'), name };
}

export function checkImageName(name: string): string {
  if (!NAME.test(name))
    throw new PostcopyError(ErrorCode.USAGE, `"${name}" is not an image name (1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)`);
  return name;
}

export function formatStoreUrl(a: StoreAddress, name?: string): string {
  return `s3://${[a.bucket, a.prefix, name].filter((p) => p).join('/')}`;
}
