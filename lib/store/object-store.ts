// One S3-compatible bucket (Ceph RGW, MinIO, AWS S3, R2) seen from a store's
// prefix: get, put, head, list and delete, each retried with backoff and
// jitter on timeouts, resets, 5xx and throttling (the AWS SDK's standard
// retries), and every failure turned into one of our codes naming the object.
// Credentials and endpoint are found the AWS way (explicit options first):
// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the shared
// files ~/.aws/credentials and ~/.aws/config; AWS_ENDPOINT_URL_S3 or
// AWS_ENDPOINT_URL; AWS_REGION or AWS_DEFAULT_REGION. Addressing is
// path-style, which every S3-compatible endpoint takes.
import { lookup } from 'node:dns/promises';
import { Agent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import {
  CreateBucketCommand,
  DeleteObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { NodeHttpHandler } from '@smithy/node-http-handler';
import { ErrorCode, PostcopyError } from '../errors.js';
import { silentLogger, type Logger } from '../logger.js';
import type { StoreGetsConfig } from '../native.js';
import { formatStoreUrl, type StoreAddress } from './address.js';
import { SignedGetter, type GetAnswer, type SigningCredentials } from './signed-get.js';

// The SDK warns on every process that Node 20 loses its updates after January 2027: the lock file pins a release that runs here.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

/** How to reach the store; anything not given is found the AWS way (see above). */
export interface StoreCredentials {
  /** http(s)://host:port of an S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS itself). */
  endpoint?: string;
  region?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
}

export interface ObjectStoreOptions extends StoreCredentials {
  logger?: Logger;
  /** A request with no answer for this long is retried (default 10 s). */
  requestTimeoutMs?: number;
  /** Attempts per request, the first included (default 5). */
  maxAttempts?: number;
  /** Requests in flight at most (default 128). */
  maxSockets?: number;
}

export interface StoredObject {
  key: string;
  size: number;
  lastModified: Date;
}

/** What this process asked of the store. */
export interface ObjectStoreStats {
  gets: number;
  bytesFetched: number;
  puts: number;
  bytesUploaded: number;
  heads: number;
  lists: number;
  deletes: number;
}

export class ObjectStore {
  readonly address: StoreAddress;
  readonly endpoint: string;
  readonly stats: ObjectStoreStats = { gets: 0, bytesFetched: 0, puts: 0, bytesUploaded: 0, heads: 0, lists: 0, deletes: 0 };
  readonly #client: S3Client;
  readonly #log: Logger;
  readonly #timeoutMs: number;
  readonly #maxAttempts: number;
  readonly #getter: SignedGetter;
  #credentials: { value: SigningCredentials; expires: number } | null = null;

  constructor(address: StoreAddress, options: ObjectStoreOptions = {}) {
    this.address = address;
    this.#log = options.logger ?? silentLogger;
    this.#timeoutMs = options.requestTimeoutMs ?? 10_000;
    this.#maxAttempts = options.maxAttempts ?? 5;
    const endpoint = options.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL;
    this.endpoint = endpoint ?? 'https://s3.amazonaws.com';
    const maxSockets = options.maxSockets ?? 128;
    const httpAgent = new Agent({ keepAlive: true, maxSockets });
    const httpsAgent = new HttpsAgent({ keepAlive: true, maxSockets });
    const region = options.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1';
    // No endpoint given: AWS itself, at the region's own endpoint (path-style there too; the global one answers other regions with a redirect).
    const getFrom = endpoint ?? `https://s3.${region}.amazonaws.com`;
    this.#getter = new SignedGetter(getFrom, region, getFrom.startsWith('https:') ? httpsAgent : httpAgent);
    const config: S3ClientConfig = {
      region,
      ...(endpoint ? { endpoint } : {}),
      forcePathStyle: true,
      // Streaming checksums send bodies aws-chunked, which RGW and others refuse (MissingContentLength); every chunk carries its own hash anyway.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      maxAttempts: options.maxAttempts ?? 5,
      requestHandler: new NodeHttpHandler({
        connectionTimeout: Math.min(3000, options.requestTimeoutMs ?? 10_000),
        requestTimeout: options.requestTimeoutMs ?? 10_000,
        // A request past its time fails (and is retried); by default the handler only warns and the request waits forever (a blackholed link).
        throwOnRequestTimeout: true,
        httpAgent,
        httpsAgent,
      }),
      ...(options.accessKeyId && options.secretAccessKey
        ? { credentials: { accessKeyId: options.accessKeyId, secretAccessKey: options.secretAccessKey } }
        : {}),
    };
    this.#client = new S3Client(config);
  }

  /** The key of `name` under the store's prefix. */
  key(name: string): string {
    return this.address.prefix ? `${this.address.prefix}/${name}` : name;
  }

  /**
   * The object's bytes; `range`: [first byte, last byte] inclusive. Signed by
   * hand (signed-get.ts). A request with no answer, or a body that stops
   * coming (a link gone silent mid-transfer), fails after the request timeout
   * and is tried again, as are resets, 5xx and throttling.
   */
  async get(name: string, range?: [number, number]): Promise<Buffer> {
    const credentials = await this.#signingCredentials(name);
    for (let attempt = 1; ; attempt++) {
      this.stats.gets++;
      let answer: GetAnswer;
      try {
        answer = await this.#getter.get(this.address.bucket, this.key(name), credentials, range, this.#timeoutMs);
      } catch (err) {
        // No answer: a reset, a refused connection, a link gone silent. Tried again after the backoff.
        const e = err as { code?: string; name?: string; message?: string };
        answer = { ok: false, status: 0, code: e.code ?? e.name ?? 'Error', message: e.message ?? '' };
      }
      if (answer.ok) {
        this.stats.bytesFetched += answer.body.length;
        return answer.body;
      }
      const again = answer.status === 0 || answer.status >= 500 || answer.status === 429 || answer.code === 'SlowDown' || answer.code === 'RequestTimeout';
      if (!again || attempt >= this.#maxAttempts)
        throw this.#coded({ name: answer.code, message: answer.message, $metadata: { httpStatusCode: answer.status || undefined, attempts: attempt } }, name);
      // Full jitter over a backoff that doubles from 100 ms, up to 20 s (as the SDK's standard retries).
      await new Promise((resolve) => setTimeout(resolve, Math.random() * Math.min(20_000, 100 * 2 ** (attempt - 1))));
    }
  }

  /**
   * What a restore's engine needs to GET `names` itself (addon/store_getter.h):
   * the endpoint's address, the signing keys, each object's path. Null where
   * it cannot: an https endpoint (the engine speaks plain HTTP), or keys that
   * expire (the engine is given them once; these GETs stay here, where the
   * keys are renewed).
   */
  async inEngineGets(names: string[]): Promise<Omit<StoreGetsConfig, 'places' | 'connections'> | null> {
    const url = this.#getter.endpoint;
    if (url.protocol !== 'http:') return null;
    const credentials = await this.#signingCredentials(names[0] ?? '');
    if (this.#credentials && Number.isFinite(this.#credentials.expires)) return null;
    const hostname = url.hostname.replace(/^\[|\]$/g, '');
    const found = await lookup(hostname).catch(() => null);
    if (!found) return null;
    return {
      address: found.address,
      ipv6: found.family === 6,
      port: Number(url.port || 80),
      host: url.host,
      region: this.#getter.region,
      keyId: credentials.accessKeyId,
      secret: credentials.secretAccessKey,
      token: credentials.sessionToken ?? '',
      packs: names.map((name) => this.#getter.path(this.address.bucket, this.key(name))),
      timeoutMs: this.#timeoutMs,
    };
  }

  /** The credentials GETs are signed with: the explicit ones, else the SDK's chain (env, profile, shared files, roles), again once they expire. */
  async #signingCredentials(name: string): Promise<SigningCredentials> {
    if (this.#credentials && Date.now() < this.#credentials.expires) return this.#credentials.value;
    try {
      const found = await this.#client.config.credentials();
      const expires = found.expiration ? found.expiration.getTime() - 60_000 : Infinity;
      this.#credentials = { value: { accessKeyId: found.accessKeyId, secretAccessKey: found.secretAccessKey, sessionToken: found.sessionToken }, expires };
      return this.#credentials.value;
    } catch (err) {
      throw this.#coded(err, name);
    }
  }

  /** Writes the object; `metadata` (short ASCII values) comes back with its head. */
  async put(name: string, body: Uint8Array, contentType = 'application/octet-stream', metadata?: Record<string, string>): Promise<void> {
    this.stats.puts++;
    try {
      await this.#client.send(
        new PutObjectCommand({
          Bucket: this.address.bucket,
          Key: this.key(name),
          Body: body,
          ContentType: contentType,
          ...(metadata ? { Metadata: metadata } : {}),
        }),
      );
      this.stats.bytesUploaded += body.length;
    } catch (err) {
      throw this.#coded(err, name);
    }
  }

  /** The object's size, age and metadata (names in lower case), or null when there is none. */
  async head(name: string): Promise<{ size: number; lastModified: Date; metadata: Record<string, string> } | null> {
    this.stats.heads++;
    try {
      const out = await this.#client.send(new HeadObjectCommand({ Bucket: this.address.bucket, Key: this.key(name) }));
      const metadata: Record<string, string> = {};
      for (const [k, v] of Object.entries(out.Metadata ?? {})) metadata[k.toLowerCase()] = v;
      return { size: out.ContentLength ?? 0, lastModified: out.LastModified ?? new Date(0), metadata };
    } catch (err) {
      const coded = this.#coded(err, name);
      if (coded.code === ErrorCode.STORE_NOT_FOUND && !/bucket/.test(coded.message)) return null;
      throw coded;
    }
  }

  /** Every object whose name starts with `under` (names relative to the store's prefix). */
  async *list(under: string): AsyncGenerator<StoredObject> {
    let token: string | undefined;
    const strip = this.address.prefix ? this.address.prefix.length + 1 : 0;
    do {
      this.stats.lists++;
      let out;
      try {
        out = await this.#client.send(
          new ListObjectsV2Command({ Bucket: this.address.bucket, Prefix: this.key(under), ...(token ? { ContinuationToken: token } : {}) }),
        );
      } catch (err) {
        throw this.#coded(err, `${under}*`);
      }
      for (const o of out.Contents ?? []) if (o.Key) yield { key: o.Key.slice(strip), size: o.Size ?? 0, lastModified: o.LastModified ?? new Date(0) };
      token = out.IsTruncated ? out.NextContinuationToken : undefined;
    } while (token);
  }

  /** Deletes the objects (a missing one is not an error), `parallel` requests at a time. */
  async delete(names: readonly string[], parallel = 16): Promise<void> {
    let next = 0;
    const worker = async () => {
      while (next < names.length) {
        const name = names[next++];
        this.stats.deletes++;
        try {
          await this.#client.send(new DeleteObjectCommand({ Bucket: this.address.bucket, Key: this.key(name) }));
        } catch (err) {
          const coded = this.#coded(err, name);
          if (coded.code !== ErrorCode.STORE_NOT_FOUND) throw coded;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(parallel, names.length) }, worker));
  }

  /** Creates the bucket unless it exists already. */
  async createBucket(): Promise<void> {
    try {
      await this.#client.send(new CreateBucketCommand({ Bucket: this.address.bucket }));
      this.#log.info({ bucket: this.address.bucket, endpoint: this.endpoint }, 'bucket created');
    } catch (err) {
      const name = (err as { name?: string }).name;
      if (name === 'BucketAlreadyOwnedByYou' || name === 'BucketAlreadyExists') return;
      throw this.#coded(err, '');
    }
  }

  /** Closes the connections kept alive. */
  close(): void {
    this.#client.destroy();
  }

  /** The SDK's error (after its retries) as one of ours, naming the object and the endpoint. */
  #coded(err: unknown, name: string): PostcopyError {
    const e = err as { name?: string; code?: string; message?: string; $metadata?: { httpStatusCode?: number; attempts?: number } };
    const status = e.$metadata?.httpStatusCode;
    const where = `${formatStoreUrl(this.address)}${name ? `/${name}` : ''} at ${this.endpoint}`;
    const attempts = e.$metadata?.attempts;
    const details = { endpoint: this.endpoint, status, cause: e.name ?? e.code };
    if (e.name === 'NoSuchBucket') return new PostcopyError(ErrorCode.STORE_NOT_FOUND, `no bucket "${this.address.bucket}" at ${this.endpoint}`, details);
    if (e.name === 'NoSuchKey' || e.name === 'NotFound' || status === 404)
      return new PostcopyError(ErrorCode.STORE_NOT_FOUND, `${where}: no such object`, details);
    if (status === 403 || e.name === 'AccessDenied' || e.name === 'InvalidAccessKeyId' || e.name === 'SignatureDoesNotMatch')
      return new PostcopyError(ErrorCode.STORE_DENIED, `${where}: refused (${e.name ?? status}): check the access key and secret`, details);
    if (status === 416 || e.name === 'InvalidRange')
      return new PostcopyError(ErrorCode.STORE_CORRUPT, `${where}: no such byte range (what named it points past the object's end)`, details);
    if (e.name === 'CredentialsProviderError')
      return new PostcopyError(ErrorCode.STORE_DENIED, `no credentials for ${where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE`, details);
    return new PostcopyError(
      ErrorCode.STORE_UNREACHABLE,
      `${where}: ${e.name ?? e.code ?? 'failed'}${status ? ` (HTTP ${status})` : ''}${attempts ? ` after ${attempts} attempt(s)` : ''}: ${e.message ?? ''}`,
      details,
    );
  }
}
