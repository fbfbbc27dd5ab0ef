// The real object store for a test file: test/store/up.sh brings Ceph's RGW
// up on this host (or finds it up), and each test file gets buckets of its
// own. Nothing here is a mock: every request goes to the gateway.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { Test } from 'tap';
import { ObjectStore } from '../../lib/store/object-store.js';
import { here } from '../helpers.js';

let env: Record<string, string> | null = null;

/** The store's endpoint and keys (AWS_* variables), set in this process's environment too. */
export function storeEnv(): Record<string, string> {
  if (env) return env;
  const out = execFileSync('bash', [join(here, 'store', 'up.sh')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], timeout: 300_000 });
  env = {};
  for (const line of out.split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (m) env[m[1]] = m[2];
  }
  Object.assign(process.env, env);
  return env;
}

/** A fresh bucket for this test (removed with what it holds at the end): s3://BUCKET. */
export async function freshBucket(t: Test): Promise<string> {
  storeEnv();
  const bucket = `pc-${randomBytes(5).toString('hex')}`;
  const objects = new ObjectStore({ bucket, prefix: '' });
  await objects.createBucket();
  t.teardown(async () => {
    const names: string[] = [];
    for await (const o of objects.list('')) names.push(o.key);
    await objects.delete(names).catch(() => {});
    objects.close();
  });
  return `s3://${bucket}`;
}
