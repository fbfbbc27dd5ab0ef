// A GET of one object, signed by hand (AWS Signature Version 4) and sent on
// Node's own keep-alive agent: the path every chunk a restore needs takes.
// The AWS SDK's middleware stack costs about 1.2 ms of CPU per request here,
// more than the request itself on a fast store; signing costs four HMACs and
// one SHA-256. Everything else (put, list, delete, the credential chain)
// stays with the SDK, which also finds the credentials this signs with.
import { createHash, createHmac } from 'node:crypto';
import { request as httpRequest, type Agent } from 'node:http';
import { request as httpsRequest, type Agent as HttpsAgent } from 'node:https';

export interface SigningCredentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

/** What a GET came back with: the body of a 200 or 206, else the status and the S3 error code the body names. */
export type GetAnswer = { ok: true; body: Buffer } | { ok: false; status: number; code: string; message: string };

const hmac = (key: Buffer | string, data: string) => createHmac('sha256', key).update(data).digest();
const sha256Hex = (data: string) => createHash('sha256').update(data).digest('hex');

/** A path's bytes encoded as SigV4 wants them: every byte but A-Z a-z 0-9 - . _ ~ and the slashes. */
export function encodePath(path: string): string {
  return path
    .split('/')
    .map((segment) => encodeURIComponent(segment).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`))
    .join('/');
}

export class SignedGetter {
  readonly #endpoint: URL;
  readonly #region: string;
  readonly #agent: Agent | HttpsAgent;
  /** The signing key of one day (it depends only on the secret, the date and the region). */
  #key: { day: string; secret: string; key: Buffer } | null = null;

  constructor(endpoint: string, region: string, agent: Agent | HttpsAgent) {
    this.#endpoint = new URL(endpoint);
    this.#region = region;
    this.#agent = agent;
  }

  /** The endpoint, its region. */
  get endpoint(): URL {
    return this.#endpoint;
  }

  get region(): string {
    return this.#region;
  }

  /** The path of /BUCKET/KEY at the endpoint, encoded as signed. */
  path(bucket: string, key: string): string {
    const base = this.#endpoint.pathname.replace(/\/$/, '');
    return encodePath(`${base}/${bucket}/${key}`);
  }

  /** The headers that sign GET `path` (already encoded) at `now`. */
  sign(path: string, credentials: SigningCredentials, now = new Date()): Record<string, string> {
    const amzDate = now
      .toISOString()
      .replace(/[-:]/g, '')
      .replace(/\.\d{3}/, '');
    const day = amzDate.slice(0, 8);
    const headers: Record<string, string> = {
      host: this.#endpoint.host,
      'x-amz-content-sha256': 'UNSIGNED-PAYLOAD',
      'x-amz-date': amzDate,
      ...(credentials.sessionToken ? { 'x-amz-security-token': credentials.sessionToken } : {}),
    };
    const names = Object.keys(headers).sort();
    const canonical = ['GET', path, '', ...names.map((n) => `${n}:${headers[n]}`), '', names.join(';'), 'UNSIGNED-PAYLOAD'].join('\n');
    const scope = `${day}/${this.#region}/s3/aws4_request`;
    const toSign = ['AWS4-HMAC-SHA256', amzDate, scope, sha256Hex(canonical)].join('\n');
    if (this.#key?.day !== day || this.#key.secret !== credentials.secretAccessKey) {
      const key = hmac(hmac(hmac(hmac(`AWS4${credentials.secretAccessKey}`, day), this.#region), 's3'), 'aws4_request');
      this.#key = { day, secret: credentials.secretAccessKey, key };
    }
    const signature = createHmac('sha256', this.#key.key).update(toSign).digest('hex');
    headers.authorization = `AWS4-HMAC-SHA256 Credential=${credentials.accessKeyId}/${scope}, SignedHeaders=${names.join(';')}, Signature=${signature}`;
    return headers;
  }

  /**
   * One GET of /BUCKET/KEY (path-style), `range` inclusive. Rejects on a
   * network failure, or when no byte comes for `timeoutMs` (headers or body);
   * resolves with the body, or with the status and error code of a refusal.
   */
  get(bucket: string, key: string, credentials: SigningCredentials, range: [number, number] | undefined, timeoutMs: number): Promise<GetAnswer> {
    const path = this.path(bucket, key);
    const headers = this.sign(path, credentials);
    if (range) headers.range = `bytes=${range[0]}-${range[1]}`;
    const send = this.#endpoint.protocol === 'https:' ? httpsRequest : httpRequest;
    return new Promise((resolve, reject) => {
      const req = send(
        // An IPv6 endpoint's hostname comes bracketed ([::1]): the request wants the address alone.
        {
          host: this.#endpoint.hostname.replace(/^\[|\]$/g, ''),
          port: this.#endpoint.port || undefined,
          path,
          method: 'GET',
          headers,
          agent: this.#agent as Agent,
        },
        (res) => {
          const parts: Buffer[] = [];
          res.on('data', (d: Buffer) => {
            parts.push(d);
            req.setTimeout(timeoutMs); // a body that keeps coming is not stalled
          });
          res.once('end', () => {
            const body = Buffer.concat(parts);
            const status = res.statusCode ?? 0;
            if (status === 200 || status === 206) return resolve({ ok: true, body });
            const text = body.toString('utf8');
            const code = /<Code>([^<]*)<\/Code>/.exec(text)?.[1] ?? (status === 404 ? 'NotFound' : `HTTP${status}`);
            const message = /<Message>([^<]*)<\/Message>/.exec(text)?.[1] ?? '';
            resolve({ ok: false, status, code, message });
          });
          res.once('error', reject);
        },
      );
      req.setTimeout(timeoutMs, () => req.destroy(Object.assign(new Error(`no answer for ${timeoutMs} ms`), { name: 'TimeoutError', code: 'ETIMEDOUT' })));
      req.once('error', reject);
      req.end();
    });
  }
}
