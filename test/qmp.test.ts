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

t.test(
  'an event is waited for by name: the next one of that name, with its data; none within the bound is ERR_TIMEOUT; a closed monitor fails the wait',
  async (t) => {
    const path = join(tempDir(t), 'events.sock');
    const sockets: import('node:net').Socket[] = [];
    const server = createServer((s) => {
      sockets.push(s);
      s.write(JSON.stringify({ QMP: { version: {}, capabilities: [] } }) + '\n');
      s.on('data', (d) => {
        for (const line of d.toString().split('\n').filter(Boolean)) {
          const { execute } = JSON.parse(line) as { execute: string };
          // `cont` is answered, then the guest runs: an event of another name first, then RESUME.
          s.write(JSON.stringify({ return: {} }) + '\n');
          if (execute === 'cont') s.write(JSON.stringify({ event: 'STOP' }) + '\n' + JSON.stringify({ event: 'RESUME', data: { reason: 'test' } }) + '\n');
        }
      });
      s.on('error', () => {});
    });
    server.listen(path);
    t.teardown(() => server.close());
    const qmp = await Qmp.connect(path);
    const before = performance.now();
    const resumed = qmp.nextEvent('RESUME', 10_000);
    await qmp.execute('cont');
    const e = await resumed;
    t.equal(e.event, 'RESUME');
    t.same(e.data, { reason: 'test' });
    t.ok(e.at >= before, 'when it came');
    await t.rejects(qmp.nextEvent('SHUTDOWN', 50), { code: ErrorCode.TIMEOUT, message: /SHUTDOWN/ });
    const gone = qmp.nextEvent('SHUTDOWN', 10_000);
    for (const s of sockets) s.destroy();
    await t.rejects(gone, { code: ErrorCode.QMP_FAILED });
    qmp.close();
  },
);
