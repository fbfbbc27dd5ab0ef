// serve and handle as services, through the real CLI: systemd's readiness
// protocol (NOTIFY_SOCKET, heard here by a python3 receiver bound the way
// systemd binds its own), and --pidfile.
import t from 'tap';
import type { Test } from 'tap';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect } from 'node:net';
import { createInterface } from 'node:readline';
import { randomImage, runCli, spawnCli, tempDir, until, writeImage } from './helpers.js';

// Binds a unix datagram socket at argv[1], says so, then prints each datagram as a JSON string on its own line.
const RECEIVER = `
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print(json.dumps({"bound": sys.argv[1]}), flush=True)
while True:
    print(json.dumps(s.recv(65536).decode()), flush=True)
`;

/** A service manager's notify socket in a temp dir: the datagrams it got, each as its KEY=VALUE fields. */
async function notifySocket(t: Test): Promise<{ path: string; datagrams: Record<string, string>[] }> {
  const path = join(tempDir(t), 'notify.sock');
  const receiver = spawn('python3', ['-c', RECEIVER, path], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => receiver.kill());
  const datagrams: Record<string, string>[] = [];
  let bound = false;
  createInterface({ input: receiver.stdout }).on('line', (line) => {
    const value = JSON.parse(line);
    if (typeof value !== 'string') return void (bound = true);
    datagrams.push(
      Object.fromEntries(
        value
          .trimEnd()
          .split('\n')
          .map((f: string) => [f.slice(0, f.indexOf('=')), f.slice(f.indexOf('=') + 1)]),
      ),
    );
  });
  await until('the receiver to bind its socket', () => bound, 10_000);
  return { path, datagrams };
}

/** Connects to a unix socket: resolves once connected (the service serves), rejects otherwise. */
function accepts(path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = connect(path, () => {
      socket.destroy();
      resolve();
    });
    socket.once('error', reject);
  });
}

const services = [
  { command: 'serve', args: (dir: string, image: string) => ['--image', image, '--listen', `unix:${join(dir, 'source.sock')}`], socket: 'source.sock' },
  { command: 'handle', args: (dir: string, image: string) => ['--socket', join(dir, 'handler.sock'), '--image', image], socket: 'handler.sock' },
];

for (const { command, args, socket } of services) {
  t.test(`${command} under a service manager: READY=1 with its pid once it listens, STOPPING=1 at SIGTERM; --pidfile while it runs`, async (t) => {
    const dir = tempDir(t);
    const manager = await notifySocket(t);
    const pidfile = join(dir, `${command}.pid`);
    const service = spawnCli(t, [command, ...args(dir, writeImage(dir, randomImage(16))), '--pidfile', pidfile], { NOTIFY_SOCKET: manager.path });
    const ready = await until('READY=1', () => manager.datagrams.find((d) => d.READY === '1'));
    t.match(service.output().stdout, /^\{"listening":/, 'after the listening line');
    await accepts(join(dir, socket)); // and it serves
    t.equal(ready.MAINPID, String(service.child.pid), 'MAINPID is the process the manager started');
    t.match(
      ready.STATUS,
      command === 'serve' ? /^serving .*image\.bin on unix:.*source\.sock$/ : /^handling VMMs on .*handler\.sock, their pages from .*image\.bin$/,
    );
    t.equal(readFileSync(pidfile, 'utf8'), `${service.child.pid}\n`, 'the pid file holds its pid');
    service.child.kill('SIGTERM');
    const stopping = await until('STOPPING=1', () => manager.datagrams.find((d) => d.STOPPING === '1'));
    t.match(stopping.STATUS, /SIGTERM/);
    const end = await service.exited;
    t.equal(end.code, 0, end.code === 0 ? 'it exits 0' : end.stderr);
    t.notOk(existsSync(pidfile), 'the pid file is gone once it exited');
    t.same(
      manager.datagrams.map((d) => Object.keys(d)),
      [
        ['READY', 'MAINPID', 'STATUS'],
        ['STOPPING', 'STATUS'],
      ],
      'nothing else: no worker spoke for it',
    );
  });

  t.test(`${command} --pidfile in a directory that does not exist is refused before any work (exit 2)`, async (t) => {
    const dir = tempDir(t);
    const pidfile = join(dir, 'no-such-dir', `${command}.pid`);
    const r = await runCli([command, ...args(dir, join(dir, 'image.bin')), '--pidfile', pidfile]);
    t.equal(r.code, 2);
    t.equal(
      r.stderr,
      `postcopy ${command}: --pidfile ${pidfile}: the directory ${join(dir, 'no-such-dir')} does not exist (ERR_USAGE; see postcopy ${command} --help)\n`,
    );
  });
}

t.test('a notify socket nobody listens on: one warning, and it serves all the same', async (t) => {
  const dir = tempDir(t);
  const service = spawnCli(t, ['serve', ...services[0].args(dir, writeImage(dir, randomImage(16)))], {
    NOTIFY_SOCKET: join(dir, 'nobody.sock'),
    POSTCOPY_LOG_FORMAT: 'json',
  });
  await until('the listening line', () => service.output().stdout.includes('"listening"'));
  await accepts(join(dir, 'source.sock'));
  service.child.kill('SIGTERM');
  const end = await service.exited;
  t.equal(end.code, 0, 'SIGTERM ends it as usual');
  const notices = end.stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l))
    .filter((r) => r.notifySocket !== undefined);
  t.equal(notices.length, 1, 'READY and STOPPING both failed: said once');
  t.match(notices[0], { level: 40, code: 'ENOENT', notifySocket: join(dir, 'nobody.sock'), msg: /cannot tell the service manager/ });
});
