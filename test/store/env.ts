// The real object store for a test file: test/store/up.sh brings Ceph's RGW
// up on this host (or finds it up), and each test file gets buckets of its
// own. Nothing here is a mock: every request goes to the gateway.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { connect, createServer, type AddressInfo } from 'node:net';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { Test } from 'tap';
import { ObjectStore } from '../../lib/store/object-store.js';
import { here, until } from '../helpers.js';

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

/** A gateway of its own for one test, on the same cluster: killed (-9) and started again as the test says. */
export interface Gateway {
  endpoint: string;
  /** Starts it; resolves once it answers. */
  start(): Promise<void>;
  /** kill -9: connections reset, nothing answers until start(). */
  kill(): void;
}

export async function ownGateway(t: Test): Promise<Gateway> {
  storeEnv();
  const dir = process.env.POSTCOPY_STORE_DIR ?? '/tmp/uffd-postcopy-store';
  const port = await freePort();
  const name = `client.rgw.t${port}`;
  let child: ChildProcess | null = null;
  const gateway: Gateway = {
    endpoint: `http://127.0.0.1:${port}`,
    async start() {
      child = spawn('radosgw', ['-c', join(dir, 'ceph.conf'), '-n', name, '-f', '--rgw-frontends', `beast endpoint=127.0.0.1:${port} tcp_nodelay=1`], {
        stdio: 'ignore',
        detached: true,
      });
      await until('the gateway to answer', () => answers(port), 60_000);
    },
    kill() {
      child?.kill('SIGKILL');
      child = null;
    },
  };
  t.teardown(() => gateway.kill());
  await gateway.start();
  return gateway;
}

function answers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}
