import t from 'tap';
import type { Test } from 'tap';
import { closeSync, existsSync, openSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { Destination } from '../client/destination.js';
import type { RestoreReport } from '../client/report.js';
import { formatReport } from '../bin/restore.js';
import { join } from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { constants as osConstants } from 'node:os';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { createServer, type AddressInfo } from 'node:net';
import { PAGE, buildFixture, cliCommand, here, randomImage, runCli, spawnCli, startServeCli, tempDir, writeImage, until } from './helpers.js';

t.test('serve and restore as separate processes: token, --out, --json', async (t) => {
  const dir = tempDir(t);
  const image = randomImage(1024, 3);
  const imagePath = writeImage(dir, image);
  const tokenPath = join(dir, 'token');
  writeFileSync(tokenPath, 'a shared secret\n', { mode: 0o600 });
  const socket = join(dir, 'src.sock');
  const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${socket}`, '--token-file', tokenPath]);
  t.same(listening, { kind: 'unix', path: socket });
  const out = join(dir, 'restored.bin');
  // No background stream, so every page comes on demand (or with a window): faults are certain.
  const r = await runCli(['restore', '--source', `unix:${socket}`, '--token-file', tokenPath, '--out', out, '--json', '--window', '4:1', '--no-background']);
  t.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  t.match(report, { pages: 1024, digestMatch: true, window: { forward: 4, backward: 1 }, background: { enabled: false }, pagesBackground: 0 });
  t.ok(report.faults > 0, 'the default workload faulted pages in');
  t.equal(report.pagesOnDemand + report.pagesWindow, 1024);
  t.ok(readFileSync(out).equals(image), '--out holds the image');
  const logs = r.stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l));
  t.ok(
    logs.some((l) => l.msg === 'restore finished' && l.digestMatch === true),
    'pino JSON logs on stderr',
  );
});

t.test('restore over TCP with no workload is pure background transfer; TCP without --token-file gets a token only this user can read', async (t) => {
  const dir = tempDir(t);
  const image = randomImage(512);
  const { listening, tokenFile } = await startServeCli(t, ['--image', writeImage(dir, image), '--listen', 'tcp:127.0.0.1:0']);
  // On the old main this source served the image to any user of the host.
  t.equal(statSync(tokenFile!).mode & 0o777, 0o600, 'the token file it made is 0600');
  await t.rejects(
    Destination.connect({ source: `tcp:127.0.0.1:${listening.port}` }),
    { code: 'ERR_AUTH_REQUIRED' },
    'a destination without the token is refused',
  );
  const r = await runCli(['restore', '--source', `tcp:127.0.0.1:${listening.port}`, '--workload', 'none', '--json']);
  t.equal(r.code, 0, r.stderr);
  t.match(JSON.parse(r.stdout), { faults: 0, pagesBackground: 512, digestMatch: true });
});

t.test('a wrong token fails the restore, and handle, with a clear message naming the token file, and exit code 1', async (t) => {
  const dir = tempDir(t);
  writeFileSync(join(dir, 'good'), 'good', { mode: 0o600 });
  writeFileSync(join(dir, 'bad'), 'bad', { mode: 0o600 });
  const socket = join(dir, 's.sock');
  await startServeCli(t, ['--image', writeImage(dir, randomImage(8)), '--listen', `unix:${socket}`, '--token-file', join(dir, 'good')]);
  const r = await runCli(['restore', '--source', `unix:${socket}`, '--token-file', join(dir, 'bad'), '--log-format', 'pretty']);
  t.equal(r.code, 1);
  t.match(r.stderr, /the tokens differ: the source at unix:.*s\.sock holds another token than this destination's/);
  t.match(r.stderr, new RegExp(`this destination's token is from ${join(dir, 'bad')}; give both sides the same file\\) \\(ERR_AUTH_FAILED\\)`));
  // handle reads its token the same way, and names the file the same way.
  const h = await runCli(['handle', '--socket', join(dir, 'h.sock'), '--source', `unix:${socket}`, '--token-file', join(dir, 'bad'), '--log-format', 'pretty']);
  t.equal(h.code, 1);
  t.match(h.stderr, /the tokens differ/);
  t.match(h.stderr, new RegExp(`this destination's token is from ${join(dir, 'bad')}; give both sides the same file\\); not starting`));
});

t.test('serve on TCP refuses a default token file that other users can read', async (t) => {
  const dir = tempDir(t);
  const tokenFile = join(dir, 'token');
  writeFileSync(tokenFile, 'everyone can read me\n', { mode: 0o644 });
  const r = await runCli(['serve', '--image', writeImage(dir, randomImage(8)), '--listen', 'tcp:127.0.0.1:0'], { POSTCOPY_TOKEN_FILE: tokenFile });
  t.equal(r.code, 1);
  t.match(r.stderr, /ERR_AUTH_REQUIRED/);
  t.match(r.stderr, /readable by other users/);
});

t.test('usage errors exit 2 in one line naming what is wrong', async (t) => {
  const r = await runCli(['frobnicate']);
  t.equal(r.code, 2);
  t.match(r.stderr, /unknown command "frobnicate".*ERR_USAGE/);
  const missing = await runCli(['restore']);
  t.equal(missing.code, 2);
  t.match(missing.stderr, /--source or --image is required/, 'the alternative is named');
  // postcopy alone is a mistake: a short usage where mistakes go, exit 2; --help is the whole manual on stdout.
  const bare = await runCli([]);
  t.equal(bare.code, 2);
  t.equal(bare.stdout, '');
  t.match(bare.stderr, /^usage: postcopy <command>/);
  for (const b of ['latency', 'throughput', 'encryption', 'compression', 'fanout', 'local', 'localhost', 'live', 'qemu', 'store'])
    t.match(bare.stderr, new RegExp(`\\b${b}[,\\n]`), `the benchmark ${b} is listed`);
  t.match(bare.stderr, /serve a\s+snapshot to a QEMU, or restore one/, 'and every qemu command');
  t.match(bare.stderr, /postcopy --help prints every command's usage/);
  t.ok(bare.stderr.split('\n').length < 25, 'a screenful, not the manual');
  const help = await runCli(['--help']);
  t.equal(help.code, 0);
  t.ok(help.stdout.length > bare.stderr.length * 5, '--help prints it all');
});

t.test('--help on every command prints its usage and exits 0; --version prints the version', async (t) => {
  for (const command of ['serve', 'restore', 'handle', 'bench', 'demo']) {
    for (const flag of ['--help', '-h']) {
      const r = await runCli([command, flag]);
      t.equal(r.code, 0, `${command} ${flag}`);
      t.match(r.stdout, new RegExp(`^postcopy ${command}`), `${command} ${flag} prints that command's usage`);
      t.equal(r.stderr, '', 'and nothing else');
    }
  }
  const v = await runCli(['--version']);
  t.equal(v.code, 0);
  t.match(v.stdout, /^uffd-postcopy \d+\.\d+\.\d+\n$/);
});

t.test('every mistake on the command line is refused at once, in one line naming the option and the value, exit 2', async (t) => {
  const dir = tempDir(t);
  const cases: [string[], RegExp][] = [
    [['serve', '--image', 'x', '--listen', 'unix:/x', '--frob'], /unknown option --frob/],
    [['bench', 'latency', '--transport', 'udp'], /--transport must be unix, tcp, image; not "udp"/],
    [['bench', 'latency', '--transport', 'unix,udp'], /--transport must be unix, tcp, image; not "udp"/],
    [['bench', 'fanout', '--transport', 'unix,udp'], /--transport must be unix, tcp; not "udp"/],
    [['bench', 'compression', '--images', 'synthetic,nope'], /--images must be synthetic, guest; not "nope"/],
    [['bench', 'latency', '--pages', '0'], /--pages must be a whole number from 1/],
    [['bench', 'nonsense'], /unknown benchmark "nonsense"/],
    [['qemu'], /postcopy qemu takes a command: import, save, serve or restore/],
    [['qemu', 'frob'], /postcopy qemu takes import, save, serve or restore, not "frob"/],
    [['store'], /postcopy store takes a command: push, ls, rm or gc/],
    [['bench', '--transport', 'udp'], /--transport is not an option of the bench suite \(it is of latency, throughput, fanout\)/],
    [['bench', 'encryption', '--link', 'unix'], /--link is not an option of bench encryption/],
    [['restore', '--source', 'unix:/x', '--window', '-1:2'], /--window F \(pages after\) must be a whole number from 0 to 1024; not "-1"/],
    [['restore', '--source', 'unix:/x', '--window', '8'], /--window takes F:B/],
    [['restore', '--source', 'unix:/x', '--rate', '0.4'], /--rate .* must be a whole number of bytes; not "0.4"/],
    [['restore', '--source', 'unix:/x', '--workload', 'bogus'], /--workload must be random, sequential, cold-start, none; not "bogus"/],
    [['restore', '--source', 'unix:/x', '--out', join(dir, 'no-such-dir', 'out.bin')], /--out .*no-such-dir.*does not exist/],
    [['restore', '--source', 'unix:/x', '--out', dir], /--out .*is a directory/],
    [['restore', '--source', 'unix:/x', '--no-background', '--workload', 'none'], /can never finish/],
    [['restore', '--source', 'unix:/x', '--json=yes'], /--json takes no value/],
    [['restore', '--source', 'unix:/x', '--no-background', '--rate', '10M'], /--rate limits the background stream, which --no-background turns off/],
    [
      ['restore', '--source', 'unix:/x', '--workload', 'sequential', '--seed', '3'],
      /--seed orders the random and cold-start workloads; --workload sequential has no use for it/,
    ],
    [['handle', '--socket', join(dir, 'h2.sock'), '--source', 'unix:/x', '--no-background', '--rate', '1M'], /--rate limits the background stream/],
    [['restore', '--source', 'tcp:127.0.0.1:99999'], /--source "tcp:127.0.0.1:99999": port 99999 is out of range/],
    [['restore', '--source', 'tcp:host'], /--source "tcp:host": no port after the host/],
    [['restore', '--source', 'unix:/x', '--give-up-after', 'soon'], /--give-up-after takes a duration/],
    [['handle', '--socket', join(dir, 'h.sock'), '--source', 'tcp:host'], /--source "tcp:host": no port/],
    [['restore', '--image', join(dir, 'i.bin'), '--source', 'unix:/x'], /--image restores from a local file, --source from a source: give one or the other/],
    [['restore', '--source', 'unix:/x', '--record-working-set', join(dir, 'w.ws'), '--window', '4:0'], /serves each fault alone .*drop --window/],
    [['restore', '--source', 'unix:/x', '--record-working-set', join(dir, 'w.ws'), '--prefetch', join(dir, 'w.ws')], /record without a replay/],
    [['restore', '--source', 'unix:/x', '--record-working-set', join(dir, 'w.ws'), '--workload', 'none'], /--workload none touches nothing/],
    [['restore', '--source', 'unix:/x', '--no-background', '--workload', 'cold-start'], /cold-start can never finish/],
    [['handle', '--socket', join(dir, 'h3.sock'), '--image', join(dir, 'i.bin'), '--rate', '1M'], /a local --image has none to limit/],
    [['handle', '--socket', join(dir, 'h4.sock'), '--image', join(dir, 'i.bin'), '--source', 'unix:/x'], /give one or the other/],
    [['bench', 'throughput', '--transport', 'image'], /bench throughput streams from a source/],
    [['bench', 'throughput', '--transport', 'unix,image'], /bench throughput streams from a source/],
    [['bench', 'local', '--link', 'unix'], /--link is not an option of bench local/],
    [['demo', '--threads', 'abc'], /--threads must be a whole number from 1 to 64; not "abc"/],
    [['demo', '--threads', '0'], /--threads must be a whole number from 1 to 64; not "0"/],
    [['demo', '--size', '0'], /--size must be at least/],
    [['demo', '--size', '1'], /--size must be at least/],
    [['demo', '--size', '5000000'], /--size must be a whole number of 4096-byte pages/],
    [['handle'], /--socket and --source \(or --image\) are required/],
    [['handle', '--socket', join(dir, 'h5.sock')], /--source \(or --image\) is required/],
    [['serve', '--live', '--image', 'x'], /--image is for serving an image \(serve --image\); serve --live moves a running workload/],
    [['serve', '--image', 'x', '--downtime-limit', '1s'], /--downtime-limit is for moving a running workload \(serve --live --socket PATH\); add --live/],
    [
      ['serve', '--image', 'x', '--listen', `unix:${join(dir, 'no-such-dir', 's.sock')}`],
      /--listen unix:.*no-such-dir\/s\.sock: the directory .*no-such-dir does not exist/,
    ],
    [
      ['handle', '--socket', join(dir, 'no-such-dir', 'h.sock'), '--source', 'unix:/x'],
      /--socket .*no-such-dir\/h\.sock: the directory .*no-such-dir does not exist/,
    ],
  ];
  for (const [args, message] of cases) {
    const r = await runCli(args, { POSTCOPY_LOG_LEVEL: 'silent' });
    t.equal(r.code, 2, `${args.join(' ')}: exit 2`);
    t.match(r.stderr, message, `${args.join(' ')}: says what is wrong`);
    t.match(r.stderr, /ERR_USAGE/, 'with a stable code');
    t.equal(r.stderr.trim().split('\n').length, 1, 'in one line');
  }
});

t.test('errors a user can cause name the path or the address involved', async (t) => {
  const dir = tempDir(t);
  const image = await runCli(['serve', '--image', dir, '--listen', `unix:${join(dir, 's.sock')}`]);
  t.equal(image.code, 1);
  t.match(image.stderr, new RegExp(`${dir}\\): is a directory, not an image file \\(ERR_IMAGE_INVALID\\)`));
  const token = await runCli(['restore', '--source', `unix:${join(dir, 's.sock')}`, '--token-file', join(dir, 'no-token')]);
  t.equal(token.code, 1);
  t.match(token.stderr, /cannot read --token-file .*no-token/);
  const refused = await runCli(['restore', '--source', `unix:${join(dir, 'nobody.sock')}`, '--workload', 'none']);
  t.equal(refused.code, 1);
  t.match(refused.stderr, /cannot reach the source at unix:.*nobody\.sock: no such socket \(ENOENT\) \(ERR_SOURCE_UNREACHABLE\)/);
  // Another service at the address (an SSH server's banner): named as not a source, with what it said, at once.
  const ssh = createServer((socket) => socket.end('SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n'));
  await new Promise<void>((resolve) => ssh.listen(0, '127.0.0.1', resolve));
  t.teardown(() => ssh.close());
  const sshPort = (ssh.address() as AddressInfo).port;
  const banner = await runCli(['restore', '--source', `tcp:127.0.0.1:${sshPort}`, '--workload', 'none', '--log-format', 'pretty']);
  t.equal(banner.code, 1);
  t.match(
    banner.stderr,
    new RegExp(
      `the peer at tcp:127\\.0\\.0\\.1:${sshPort} is not a postcopy source \\(it began with "SSH-2\\.0-OpenSSH_9\\.2p1 Debian[^"]*"\\) \\(ERR_NOT_A_SOURCE\\)`,
    ),
  );
});

t.test('a peer that accepts and says nothing is named as not a source once the handshake time is up', async (t) => {
  const silent = createServer(() => {});
  await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
  t.teardown(() => silent.close());
  const port = (silent.address() as AddressInfo).port;
  const err = await Destination.connect({ source: `tcp:127.0.0.1:${port}`, recovery: { connectTimeoutMs: 300 } }).catch((e: unknown) => e);
  t.match(err, {
    code: 'ERR_NOT_A_SOURCE',
    message: new RegExp(`the peer at tcp:127\\.0\\.0\\.1:${port} accepted the connection but said nothing within 300 ms`),
  });
});

t.test('handle refuses to start when its source does not answer, instead of leaving the first VMM to hang', async (t) => {
  const dir = tempDir(t);
  const r = await runCli(['handle', '--socket', join(dir, 'h.sock'), '--source', `unix:${join(dir, 'no-source.sock')}`]);
  t.equal(r.code, 1);
  t.match(r.stderr, /cannot reach the source at unix:.*no-source\.sock.*not starting.*ERR_SOURCE_UNREACHABLE/);
  t.notOk(existsSync(join(dir, 'h.sock')), 'no handler socket was left behind');
});

t.test('restore --out writes exactly the image: its own size, regions end to end', async (t) => {
  const dir = tempDir(t);
  const a = randomBytes(5000);
  const b = randomBytes(3 * 4096 + 17);
  writeFileSync(join(dir, 'a.bin'), a);
  writeFileSync(join(dir, 'b.bin'), b);
  const { listening } = await startServeCli(t, ['--image', join(dir, 'a.bin'), '--image', join(dir, 'b.bin'), '--listen', `unix:${join(dir, 's.sock')}`]);
  const out = join(dir, 'out.bin');
  const r = await runCli(['restore', '--source', `unix:${listening.path}`, '--workload', 'none', '--out', out, '--json']);
  t.equal(r.code, 0, r.stderr);
  t.ok(readFileSync(out).equals(Buffer.concat([a, b])), 'the output equals the two files end to end, byte for byte');
});

t.test('benchmarks print a table by default and JSON lines with --json, never both; --transport takes a list', async (t) => {
  const table = await runCli(['bench', 'latency', '--pages', '256', '--rounds', '1', '--transport', 'unix,image']);
  t.equal(table.code, 0, table.stderr);
  t.notMatch(table.stdout, /^\{/m, 'no JSON line without --json');
  t.match(table.stdout, /^\| benchmark \| transport \| figure \| ours \| floor \| ratio \(median, spread\) \|$/m, 'a table');
  t.match(table.stdout, /^\| latency \| unix \| fault p50 \| [\d.]+ µs \| [\d.]+ µs \(unix\) \|/m, 'a row per transport and figure');
  t.match(table.stdout, /^\| latency \| image \| fault p50 \| [\d.]+ µs \| [\d.]+ µs \(local\) \|/m);
  const json = await runCli(['bench', 'throughput', '--pages', '256', '--rounds', '1', '--transport', 'unix', '--json']);
  t.equal(json.code, 0, json.stderr);
  const lines = json.stdout.trim().split('\n');
  t.equal(lines.length, 1, 'one JSON line per result, and nothing else');
  t.match(JSON.parse(lines[0]), { case: 'throughput', transport: 'unix', rounds: 1 });
  const help = await runCli(['bench', '--help']);
  t.match(help.stdout, /postcopy bench encryption \[--pages N\] \[--rounds R\] \[--seed S\] \[--json\]/, 'encryption names --json');
  t.notMatch(help.stdout, /JSON lines, then a table/, 'one convention, said once');
});

t.test(
  'the bench suite prints its headline: per link, pattern and threads, the default against the best fixed policy and its fault p50 against on-demand',
  async (t) => {
    const out = tempDir(t);
    const json = await runCli(['bench', '--link', 'unix', '--pages', '512', '--rounds', '2', '--json', '--out', out]);
    t.equal(json.code, 0, json.stderr);
    const rows = json.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    t.equal(rows.length, 4, 'one line per pattern and threads (random/1, sequential/1, hotset/1, random/2)');
    for (const row of rows) {
      t.match(row, { link: 'unix', pattern: String, threads: Number, rounds: 2, defaultVsBest: Number, faultP50VsOnDemand: Number, best: String });
      t.not(row.best, 'default', 'the best is a fixed policy');
      t.ok(row.defaultVsBestSpread[0] <= row.defaultVsBest && row.defaultVsBest <= row.defaultVsBestSpread[1], 'the median lies within its spread');
    }
    const results = JSON.parse(readFileSync(join(out, 'results.json'), 'utf8'));
    t.equal(results.rounds, 2);
    t.equal(results.results.filter((r: { placement: string }) => r.placement === 'free').length, 32, 'every policy ran twice per workload');
    t.same(results.headline, rows, 'the same headline in results.json');
    t.match(readFileSync(join(out, 'report.md'), 'utf8'), /## Headline/);
  },
);

t.test("bench latency prints one JSON line per transport: our percentiles beside the project's own floor, ratios from interleaved rounds", async (t) => {
  const r = await runCli(['bench', 'latency', '--pages', '512', '--transport', 'unix', '--json']);
  t.equal(r.code, 0, r.stderr);
  const line = JSON.parse(r.stdout.trim());
  t.match(line, { case: 'latency', transport: 'unix', pages: 512, ours: { p50_us: Number, p99_us: Number } });
  t.match(line, { rounds: 3, floor: { case: 'unix', pages: 512, p50_us: Number }, ratio: { p50: Number, p99: Number }, spread: { p50: [Number, Number] } });
  t.ok(line.spread.p50[0] <= line.ratio.p50 && line.ratio.p50 <= line.spread.p50[1], 'the median ratio lies within its spread');
});

t.test('demo: a source process, the handler and a VMM process; every byte verified by the VMM', async (t) => {
  const r = await runCli(['demo', '--size', '16M', '--threads', '2']);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /every byte matches/);
  t.match(r.stdout, /checked\s+the handler checked all \d+ pages it installed against the source image: they match/);
  t.notMatch(r.stderr, /"level":(4|5)0/, 'no warning or error on the way');
  t.match(r.stdout, /on demand\s+[\d,]+\s+window [\d,]+\s+working set [\d,]+\s+background [\d,]+/);
  t.match(r.stdout, /postcopy serve, pid \d+/);
  t.match(r.stdout, /balloon\s+\d+ pages given back; \d+ touched again and zero-filled/);
});

t.test('handle: a VMM process restores through the handler CLI; one JSON line per session', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(1024, 5));
  const tokenPath = join(dir, 'token');
  writeFileSync(tokenPath, 'tok', { mode: 0o600 });
  const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', 'tcp:127.0.0.1:0', '--token-file', tokenPath]);
  const handlerSocket = join(dir, 'handler.sock');
  const [cmd, ...pre] = cliCommand();
  const handler = spawn(
    cmd,
    [...pre, 'handle', '--socket', handlerSocket, '--source', `tcp:127.0.0.1:${listening.port}`, '--token-file', tokenPath, '--window', '4:0'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  t.teardown(() => {
    handler.kill('SIGTERM');
  });
  const lines = createInterface({ input: handler.stdout! })[Symbol.asyncIterator]();
  t.same(JSON.parse((await lines.next()).value).listening, { kind: 'unix', path: handlerSocket });
  const vmm = spawn(buildFixture('vmm'), ['--socket', handlerSocket, '--image', imagePath, '--threads', '2'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const [code] = await once(vmm, 'close');
  t.equal(code, 0, 'the VMM verified every byte');
  const summary = JSON.parse((await lines.next()).value);
  t.match(summary, { vmmPid: vmm.pid, complete: true, pages: 1024, window: { forward: 4, backward: 0 } });
});

t.test('serve and handle refuse a socket path a live process listens on, and one too long for the kernel; both exit at once', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(16));
  const socket = join(dir, 'live.sock');
  await startServeCli(t, ['--image', imagePath, '--listen', `unix:${socket}`]);
  const second = await runCli(['serve', '--image', imagePath, '--listen', `unix:${socket}`]);
  t.equal(second.code, 1);
  t.match(second.stderr, /ERR_ADDRESS_IN_USE/);
  const handler = await runCli(['handle', '--socket', socket, '--source', `unix:${socket}`]);
  t.equal(handler.code, 1);
  t.match(handler.stderr, /ERR_ADDRESS_IN_USE/);
  const r = await runCli(['restore', '--source', `unix:${socket}`, '--workload', 'none', '--json']);
  t.equal(r.code, 0, 'the first source still serves');
  // A TCP port in use: the same code and sentence as a unix path in use.
  const taken = createServer();
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
  t.teardown(() => taken.close());
  const port = (taken.address() as AddressInfo).port;
  const tcp = await runCli(['serve', '--image', imagePath, '--listen', `tcp:127.0.0.1:${port}`, '--log-format', 'pretty']);
  t.equal(tcp.code, 1);
  t.match(tcp.stderr, new RegExp(`another process is listening on tcp:127\\.0\\.0\\.1:${port} \\(ERR_ADDRESS_IN_USE\\)`));
  const long = join(dir, 'x'.repeat(120) + '.sock');
  const tooLong = await runCli(['serve', '--image', imagePath, '--listen', `unix:${long}`]);
  t.equal(tooLong.code, 1);
  t.match(tooLong.stderr, /ERR_INVALID_ADDRESS/);
  t.notOk(
    readdirSync(dir).some((f) => f.startsWith('xxxx')),
    'no truncated socket file is left',
  );
});

/** Runs the CLI on a pseudo-terminal (stdout and stderr are a terminal, as for a person typing it). */
function runOnTerminal(args: string[]): Promise<{ code: number | null; output: string }> {
  return startOnTerminal(args).done;
}

/** startOnTerminal: as runOnTerminal, with what the terminal showed so far readable while it runs. */
function startOnTerminal(args: string[]): { output: () => string; done: Promise<{ code: number | null; output: string }> } {
  const child = spawn(
    'python3',
    ['-c', 'import os, pty, sys; status = pty.spawn(sys.argv[1:]); sys.exit(os.waitstatus_to_exitcode(status))', ...cliCommand(), ...args],
    { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, POSTCOPY_LOG_LEVEL: '' } },
  );
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  return { output: () => output, done: new Promise((resolve) => child.on('close', (code) => resolve({ code, output }))) };
}

t.test('one line per error: the JSON record for scripts, the sentence with --log-format pretty', async (t) => {
  const dir = tempDir(t);
  const args = ['restore', '--source', `unix:${join(dir, 'nobody.sock')}`];
  const json = await runCli(args);
  t.equal(json.code, 1);
  const records = json.stderr
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  const errors = records.filter((r) => r.level >= 50);
  t.equal(errors.length, 1, 'one error record');
  t.match(errors[0], { code: 'ERR_SOURCE_UNREACHABLE', msg: /^postcopy restore: cannot reach the source/ });
  const quiet = await runCli([...args, '--log-level', 'error']);
  t.equal(quiet.stderr.trim().split('\n').length, 1, '--log-level error: that line alone');
  const pretty = await runCli([...args, '--log-format', 'pretty', '--log-level=error']);
  t.equal(pretty.stderr, `postcopy restore: cannot reach the source at unix:${join(dir, 'nobody.sock')}: no such socket (ENOENT) (ERR_SOURCE_UNREACHABLE)\n`);
  const bad = await runCli([...args, '--log-format', 'xml']);
  t.equal(bad.code, 2);
  t.match(bad.stderr, /--log-format must be json, pretty; not "xml"/);
});

t.test('on a terminal: the error alone, no JSON; a restore shows live figures and then its report', async (t) => {
  const dir = tempDir(t);
  const failed = await runOnTerminal(['restore', '--source', `unix:${join(dir, 'nobody.sock')}`]);
  t.equal(failed.code, 1);
  t.equal(
    failed.output.trim(),
    `postcopy restore: cannot reach the source at unix:${join(dir, 'nobody.sock')}: no such socket (ENOENT) (ERR_SOURCE_UNREACHABLE)`,
    'one line, no log records at the default level',
  );
  const imagePath = writeImage(dir, randomImage(4096, 5));
  const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 's.sock')}`]);
  const ok = await runOnTerminal(['restore', '--source', `unix:${listening.path}`, '--rate', '4M']);
  t.equal(ok.code, 0, ok.output);
  t.match(ok.output, /resident [\d.]+% \(\d+\/4096 pages\)\s+faults \d+\s+p50 [\d.]+ µs\s+p99 [\d.]+ µs\s+blocked \d+ ms/, 'live figures while it runs');
  t.match(ok.output, /digest\s+source = destination/, 'then the report');
  t.notMatch(ok.output, /"level"/, 'and no JSON log record');
  // --json into a pipe, stderr still the terminal: the figures go to the terminal, the JSON alone to the pipe.
  const piped = await runWithTerminalStderr(['restore', '--source', `unix:${listening.path}`, '--rate', '4M', '--json']);
  t.equal(piped.code, 0, piped.terminal);
  t.match(piped.terminal, /resident [\d.]+% \(\d+\/4096 pages\)/, 'live figures on the terminal');
  t.match(JSON.parse(piped.stdout), { digestMatch: true }, 'and only the report on stdout');
});

t.test('recovery on a terminal: one line per failed attempt, then "resumed after", and the pause in the report', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(4096, 9));
  const socketPath = join(dir, 's.sock');
  const first = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${socketPath}`]);
  const run = startOnTerminal(['restore', '--source', `unix:${socketPath}`, '--rate', '2M', '--workload', 'none']);
  await until('pages arrive', () => /resident [\d.]+% \([1-9]\d*\/4096 pages\)/.test(run.output()));
  first.child.kill('SIGKILL');
  await once(first.child, 'close');
  // What answers at the address for a while is not a source: each attempt is refused; the third brings the source back.
  rmSync(socketPath, { force: true });
  let refused = 0;
  const impostor = createServer((c) => {
    c.destroy();
    refused++;
  });
  await new Promise<void>((resolve) => impostor.listen(socketPath, resolve));
  await until('three attempts refused', () => refused >= 3);
  await new Promise<void>((resolve) => impostor.close(() => resolve()));
  await startServeCli(t, ['--image', imagePath, '--listen', `unix:${socketPath}`]);
  const { code, output } = await run.done;
  t.equal(code, 0, code === 0 ? 'the restore ends well' : output);
  const lines = output.split(/\r?\n|\r/).map((l) => l.replace(/\x1b\[[0-9;]*[A-Za-z]/g, ''));
  const attempts = lines.filter((l) => /resume attempt \d+ failed \(ERR_[A-Z_]+\); retrying in \d+ ms/.test(l));
  t.ok(attempts.length >= 3, `a line per failed attempt (${attempts.length})`);
  t.equal(lines.filter((l) => /^\s+(err|reason):/.test(l)).length, 0, 'each on one line');
  t.equal(lines.filter((l) => /destination state/.test(l) && /"state":"paused"/.test(l)).length, 1, 'the pause itself is said once');
  t.match(output, /resumed after \d+\.\d s/, 'the end of the pause is said');
  t.match(output, /paused\s+[\d.]+ (ms|s) with the source out of reach\s+resumed 1 time\(s\)/, 'and the report shows the pause');
  t.match(output, /digest\s+source = destination/);
});

t.test("the restore report: one name per figure, a row for precopied pages, 'none' without faults, seconds for long times", async (t) => {
  const base = {
    pages: 16384,
    bytes: 16384 * PAGE,
    faults: 0,
    minorFaults: 0,
    pagesOnDemand: 0,
    pagesWindow: 0,
    pagesBackground: 32,
    pagesPrefetched: 0,
    zeroPages: 0,
    duplicatePages: 0,
    bytesReceived: 16384 * PAGE,
    faultLatencyUs: { count: 0, p50: 0, p90: 0, p99: 0, max: 0, mean: 0 },
    blockedMs: 0,
    fullResidencyMs: 7753.01,
    window: { forward: 8, backward: 2 },
    background: { enabled: true, rateBytesPerSecond: 0 },
  } satisfies Partial<RestoreReport>;
  const live = formatReport({ ...base, precopy: { pagesPrecopied: 16352, pagesRewritten: 40, pagesDiscarded: 8, switchoverMs: 1250.5 } } as RestoreReport);
  t.match(live, /precopied\s+16,352 before the switchover at 1\.25 s\s+written again 40\s+dropped 8/, 'the precopied pages are shown');
  t.match(live, /faults\s+none\n/, 'no faults: none, not "p50 0 µs"');
  t.match(live, /every page after 7\.75 s/, 'a long time in seconds');
  t.notMatch(live, /paused/, 'no pause row when there was none');
  const short = formatReport({
    ...base,
    faults: 3,
    fullResidencyMs: 94.02,
    faultLatencyUs: { count: 3, p50: 41.5, p90: 60, p99: 70, max: 70, mean: 50 },
  } as RestoreReport);
  t.match(short, /every page after 94\.02 ms/, 'a short one in milliseconds');
  t.match(short, /faults\s+3\s+latency p50 41\.5 µs/);
  t.notMatch(short, /precopied/, 'no precopied row without a live source');
});

/** Runs the CLI with stderr on a pseudo-terminal and stdout a pipe (as `postcopy ... --json | jq` at a terminal). */
function runWithTerminalStderr(args: string[]): Promise<{ code: number | null; terminal: string; stdout: string }> {
  const script = [
    'import json, os, pty, subprocess, sys',
    'master, slave = pty.openpty()',
    'child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)',
    'os.close(slave)',
    'terminal = b""',
    'while True:',
    '    try:',
    '        chunk = os.read(master, 65536)',
    '    except OSError:',
    '        break',
    '    if not chunk:',
    '        break',
    '    terminal += chunk',
    'stdout = child.stdout.read()',
    'code = child.wait()',
    'print(json.dumps({"code": code, "terminal": terminal.decode("utf8", "replace"), "stdout": stdout.decode()}))',
  ].join('\n');
  const child = spawn('python3', ['-c', script, ...cliCommand(), ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, POSTCOPY_LOG_LEVEL: '' },
  });
  let output = '';
  child.stdout.on('data', (d) => (output += d));
  return new Promise((resolve) => child.on('close', () => resolve(JSON.parse(output))));
}

t.test("the README's way to try handle with the VMM fixture works as written", async (t) => {
  const readme = readFileSync(join(here, '..', 'README.md'), 'utf8');
  const block = /to try `handle` with it:\n\n```sh\n([\s\S]*?)```/.exec(readme)?.[1];
  t.ok(block, 'the README has the block');
  const [build, handle, vmm] = block!
    .trim()
    .split('\n')
    .map((l) => l.replace(/\s+#.*$/, '').replace(/ &$/, ''));
  const dir = tempDir(t);
  const at = (line: string) =>
    line
      .replaceAll('/tmp/handler.sock', join(dir, 'handler.sock'))
      .replaceAll('vm.mem', writeImage(dir, randomImage(2048, 11)))
      .replaceAll('./vmm-fixture', join(dir, 'vmm-fixture'));
  // Built as written, from the package's root (where test/fixtures/vmm.c is, installed or cloned).
  const built = spawnSync('sh', ['-c', at(build).replace('-o vmm-fixture', `-o ${join(dir, 'vmm-fixture')}`)], { cwd: join(here, '..'), encoding: 'utf8' });
  t.equal(built.status, 0, built.stderr);
  const [command, ...handleArgs] = at(handle).split(/\s+/);
  t.equal(command, 'postcopy');
  const handler = spawnCli(t, handleArgs);
  await until('the handler listens', () => existsSync(join(dir, 'handler.sock')) || undefined, 30_000);
  const [fixture, ...fixtureArgs] = at(vmm).split(/\s+/);
  const ran = spawnSync(fixture, fixtureArgs, { encoding: 'utf8', timeout: 120_000 });
  t.equal(ran.status, 0, ran.stderr);
  t.match(JSON.parse(ran.stdout.trim().split('\n').pop()!), { ok: true }, 'one JSON line: every byte checked');
  handler.child.kill('SIGTERM');
  await handler.exited;
});

t.test("the README's usage section is the CLI's own help, word for word", async (t) => {
  const help = await runCli(['--help']);
  t.equal(help.code, 0);
  const readme = readFileSync(join(here, '..', 'README.md'), 'utf8');
  const block = /as\n`postcopy --help` prints them[^\n]*\n\n```text\n([\s\S]*?)```/.exec(readme)?.[1];
  t.ok(block, 'the README has the block');
  t.equal(block, help.stdout.replace(/\n+$/, '\n'));
});

t.test('an image changed under its source: restore prints its report, then the mismatch, and exits 1', async (t) => {
  const dir = tempDir(t);
  const pages = 2048;
  const imagePath = writeImage(dir, randomImage(pages, 7));
  const { listening, metrics } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 's.sock')}`, '--metrics', 'tcp:127.0.0.1:0']);
  const [cmd, ...pre] = cliCommand();
  const restore = spawn(cmd, [...pre, 'restore', '--source', `unix:${listening.path}`, '--workload', 'none', '--rate', '4M', '--json'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  restore.stdout.on('data', (d) => (stdout += d));
  restore.stderr.on('data', (d) => (stderr += d));
  // Once the first run has gone out, the last page (sent last) changes in the file the source serves: its digests were taken
  // before it listened, so the page that goes out no longer matches them.
  const sent = async () => Number(/^postcopy_source_sent_bytes_total (\d+)/m.exec(await (await fetch(metrics as string)).text())?.[1] ?? 0);
  await until('the first run to go out', async () => (await sent()) > 0);
  const fd = openSync(imagePath, 'r+');
  writeSync(fd, Buffer.alloc(64, 0xee), 0, 64, (pages - 1) * PAGE);
  closeSync(fd);
  const [code] = await once(restore, 'close');
  t.equal(code, 1);
  const report = JSON.parse(stdout.trim());
  t.match(report, { pages, digestMatch: false }, 'the report comes first, and says so');
  t.match(stderr, /ERR_DIGEST_MISMATCH/, 'then the error');
});

/** Starts `postcopy demo ...args`; resolves its temp dir and its VMM's pid once it says them. */
async function startDemo(t: Test, args: string[]) {
  const [cmd, ...pre] = cliCommand();
  const child = spawn(cmd, [...pre, 'demo', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, POSTCOPY_LOG_LEVEL: 'silent' } });
  t.teardown(() => {
    child.kill('SIGKILL');
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const closed = once(child, 'close').then(([code, signal]) => ({ code: code as number | null, signal: signal as string | null, stdout, stderr }));
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  let dir = '';
  for (;;) {
    const { value, done } = await lines.next();
    if (done) throw new Error(`demo ended before starting its VMM: ${stdout} ${stderr}`);
    const image = /^\s+image\s+(\S+)\/image\.bin/.exec(value);
    if (image) dir = image[1];
    const vmm = /^\s+VMM\s+pid (\d+)/.exec(value);
    if (vmm) return { child, closed, dir, vmmPid: Number(vmm[1]) };
  }
}

t.test('demo --image of a size that is not whole pages is refused up front (ERR_USAGE), not left waiting on a VMM that cannot start', async (t) => {
  const dir = tempDir(t);
  const odd = join(dir, 'odd.mem');
  writeFileSync(odd, randomBytes(4100));
  const r = await runCli(['demo', '--image', odd], { POSTCOPY_LOG_LEVEL: 'silent' });
  t.equal(r.code, 2);
  t.match(r.stderr, /--image .*odd\.mem: 4100 bytes is not a whole number of 4096-byte pages.*ERR_USAGE/);
  t.equal(r.stderr.trim().split('\n').length, 1, 'in one line');
});

t.test('demo ends, saying so, when its VMM exits early; and leaves no temp dir', async (t) => {
  // Large enough that the VMM is surely still touching pages when it is killed (16 MiB could finish first on a loaded machine).
  const demo = await startDemo(t, ['--size', '256M', '--threads', '2']);
  process.kill(demo.vmmPid, 'SIGKILL');
  const r = await demo.closed;
  t.equal(r.code, 1, 'a failure');
  t.match(r.stdout, /FAILED/);
  t.notOk(existsSync(demo.dir), 'its temp dir is gone');
});

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  t.test(`demo stopped by ${signal} mid-way removes its temp dir and its VMM`, async (t) => {
    const demo = await startDemo(t, ['--size', '16M', '--threads', '2']);
    t.ok(existsSync(demo.dir), 'the demo made its temp dir');
    demo.child.kill(signal);
    const r = await demo.closed;
    t.equal(r.code, 128 + osConstants.signals[signal], `it ended of ${signal} (exit 128 + its number)`);
    t.notOk(existsSync(demo.dir), 'its temp dir is gone');
    t.throws(() => process.kill(demo.vmmPid, 0), { code: 'ESRCH' }, 'its VMM is gone');
  });
}

t.test('Ctrl-C during a restore: exit 130, it says what was interrupted and that nothing was written, and the source is told goodbye', async (t) => {
  const dir = tempDir(t);
  const imagePath = writeImage(dir, randomImage(4096, 6));
  const serve = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 's.sock')}`]);
  const out = join(dir, 'out.mem');
  // Slow: a background of 1 MiB/s and no workload, so the restore is surely under way when interrupted.
  const restore = spawnCli(t, ['restore', '--source', `unix:${serve.listening.path}`, '--rate', '1M', '--workload', 'none', '--out', out]);
  await until('the restore runs', () => /"state":"running"/.test(restore.output().stderr) || undefined, 30_000);
  restore.child.kill('SIGINT');
  const ended = await restore.exited;
  t.equal(ended.code, 130);
  t.match(
    ended.stderr,
    new RegExp(`postcopy restore: interrupted \\(SIGINT\\) with [\\d.]+% of the image resident; nothing was written to ${out}; the source was told goodbye`),
  );
  t.notOk(existsSync(out), 'no --out file');
  await until('the source lets the session go at once', () => /the destination said bye/.test(serve.log()) || undefined, 10_000);
});
