// lib/qmp.ts against a real unix socket standing in for QEMU's monitor: QEMU
// creates the socket file when it binds and listens a moment later, so a
// caller that starts QEMU and connects at once must not fail on that gap.
import t from 'tap';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { Qmp } from '../lib/qmp.js';
import { ErrorCode } from '../lib/errors.js';
import { tempDir } from './helpers.js';

function monitor(path: string): Server {
  const server = createServer((s) => {
    s.write(JSON.stringify({ QMP: { version: {}, capabilities: [] } }) + '\n');
    s.on('data', () => s.write(JSON.stringify({ return: {} }) + '\n'));
    s.on('error', () => {});
  });
  server.listen(path);
  return server;
}

t.test('a monitor that starts listening after the caller began connecting is reached', async (t) => {
  const path = join(tempDir(t), 'qmp.sock');
  let server: Server | undefined;
  t.teardown(() => server?.close());
  const reached = Qmp.connect(path, 10_000);
  // The connect starts while nothing is there (ENOENT); the monitor appears
  // once the first attempt has failed.
  setImmediate(() => (server = monitor(path)));
  const qmp = await reached;
  t.ok(qmp, 'connected and negotiated capabilities');
  qmp.close();
});

t.test('a monitor that never appears fails within the bound, naming the path', async (t) => {
  const path = join(tempDir(t), 'never.sock');
  await t.rejects(Qmp.connect(path, 300), { code: ErrorCode.QMP_FAILED, message: new RegExp(path) });
});
