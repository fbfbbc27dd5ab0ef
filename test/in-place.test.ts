// In place: on one host, a source whose image is shared memory (tmpfs, a
// memfd) hands its fds to the destination, which maps them: the memory is the
// source's own, no page is copied and nothing faults. Any other source (TCP,
// an image on disk) is copied as usual. Real tmpfs files, memfds, sockets.
import t from 'tap';
import {
  closeSync,
  ftruncateSync,
  linkSync,
  lstatSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { Image } from '../lib/image.js';
import { PageServer } from '../server/page-server.js';
import { SourceConnection } from '../client/source-connection.js';
import { VmmHandler, type VmmSessionSummary } from '../client/vmm-handler.js';
import { mapFile, memfdCreate } from '../lib/memory.js';
import { buildFixture, randomImage, runCli, startServeCli, tempDir, writeImage } from './helpers.js';
import type { Test } from 'tap';

/** A directory on tmpfs (/dev/shm), removed at teardown. */
function shmDir(t: Test): string {
  const dir = mkdtempSync('/dev/shm/uffd-postcopy-');
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function serve(t: Test, image: Image, where: string): Promise<string> {
  const server = new PageServer({ image, ...(where.startsWith('tcp:') ? { token: 'a token for tcp' } : {}) });
  t.teardown(async () => {
    await server.close();
    image.close();
  });
  const a = await server.listen(where);
  return a.kind === 'unix' ? `unix:${a.path}` : `tcp:127.0.0.1:${a.port}`;
}

t.test('a tmpfs image is taken in place: the destination maps the source memory itself', async (t) => {
  const bytes = randomImage(256, 5);
  const path = writeImage(shmDir(t), bytes);
  const source = await serve(t, Image.open([{ path }]), `unix:${join(tempDir(t), 'source.sock')}`);
  const taken = await SourceConnection.takeMemory({ source });
  t.ok(taken, 'the source offers its memory in place');
  t.equal(taken!.fds.length, 1);
  const memory = mapFile(taken!.fds[0], taken!.regions[0].length, { shared: true });
  closeSync(taken!.fds[0]);
  t.teardown(() => memory.unmap());
  t.ok(Buffer.from(memory.buffer()).equals(bytes), 'every byte is there at once, with no fault and no copy');
  // The same memory, not a copy: a write here is in the source's file.
  memory.buffer()[7 * 4096 + 3] ^= 0xff;
  t.equal(readFileSync(path)[7 * 4096 + 3], bytes[7 * 4096 + 3] ^ 0xff, "a write through the destination's mapping is in the source's file");
});

t.test('a memfd image is taken in place too, several regions', async (t) => {
  const parts = [randomImage(64), randomImage(32)];
  const fds = parts.map((p, i) => {
    const fd = memfdCreate(`image-${i}`);
    ftruncateSync(fd, p.length);
    writeSync(fd, p, 0, p.length, 0);
    return fd;
  });
  t.teardown(() => fds.forEach((fd) => closeSync(fd)));
  const source = await serve(t, Image.open(fds.map((fd) => ({ fd }))), `unix:${join(tempDir(t), 'source.sock')}`);
  const taken = await SourceConnection.takeMemory({ source });
  t.ok(taken);
  t.equal(taken!.fds.length, 2);
  taken!.regions.forEach((r, i) => {
    const m = mapFile(taken!.fds[i], r.length, { shared: true });
    t.ok(Buffer.from(m.buffer()).equals(parts[i]), `region ${i} byte for byte`);
    m.unmap();
    closeSync(taken!.fds[i]);
  });
});

t.test('a source that cannot pass its memory says so: an image on disk, or TCP', async (t) => {
  const onDisk = writeImage(tempDir(t), randomImage(16));
  const disk = await serve(t, Image.open([{ path: onDisk }]), `unix:${join(tempDir(t), 'disk.sock')}`);
  t.equal(await SourceConnection.takeMemory({ source: disk }), null, 'an image on disk: no');
  const shm = writeImage(shmDir(t), randomImage(16));
  const tcp = await serve(t, Image.open([{ path: shm }]), 'tcp:127.0.0.1:0');
  t.equal(await SourceConnection.takeMemory({ source: tcp, token: 'a token for tcp' }), null, 'over TCP: no');
});

t.test('postcopy restore --in-place: nothing copied from a tmpfs image; copied as usual from one on disk', async (t) => {
  const bytes = randomImage(512, 9);
  const shmPath = writeImage(shmDir(t), bytes);
  const { listening } = await startServeCli(t, ['--image', shmPath, '--listen', `unix:${join(tempDir(t), 'shm.sock')}`]);
  const out = join(tempDir(t), 'out.bin');
  const r = await runCli(['restore', '--source', `unix:${listening.path}`, '--in-place', '--out', out, '--json', '--log-level', 'warn']);
  t.equal(r.code, 0, r.stderr);
  const report = JSON.parse(r.stdout.trim());
  t.match(report, { inPlace: true, pages: 512, bytesReceived: 0, regions: 1 });
  t.equal(report.sha256[0], createHash('sha256').update(bytes).digest('hex'), 'the memory taken is the image');
  t.ok(readFileSync(out).equals(bytes));

  const diskPath = writeImage(tempDir(t), bytes);
  const disk = await startServeCli(t, ['--image', diskPath, '--listen', `unix:${join(tempDir(t), 'disk.sock')}`]);
  const copied = await runCli(['restore', '--source', `unix:${disk.listening.path}`, '--in-place', '--json']);
  t.equal(copied.code, 0, 'copied as usual');
  t.match(copied.stderr, /does not offer its memory in place .*copying instead/);
  t.match(JSON.parse(copied.stdout.trim()), { digestMatch: true, pages: 512 });

  const usage = await runCli(['restore', '--source', `unix:${disk.listening.path}`, '--in-place', '--window', '4:0']);
  t.equal(usage.code, 2);
  t.match(usage.stderr, /--in-place copies no page/);
});

t.test('handle --in-place: each VMM session serves its faults from the source memory, here; it no longer needs the source', async (t) => {
  const dir = tempDir(t);
  const bytes = randomImage(2048, 5);
  const shmPath = writeImage(shmDir(t), bytes);
  const server = new PageServer({ image: Image.open([{ path: shmPath }]) });
  const where = await server.listen(`unix:${join(dir, 'source.sock')}`);
  const handler = new VmmHandler({ source: `unix:${(where as { path: string }).path}`, inPlace: true, background: { enabled: false } });
  await handler.listen(join(dir, 'handler.sock'));
  t.teardown(() => handler.close());
  const ended = once(handler, 'session-end').then(([s]) => s as VmmSessionSummary);
  const child = spawn(buildFixture('vmm'), ['--socket', join(dir, 'handler.sock'), '--image', shmPath, '--threads', '2', '--start-after-ms', '300'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  await once(handler, 'session-start');
  await server.close(); // the source goes away: the session holds its memory
  const [code] = await once(child, 'close');
  t.equal(code, 0, 'the VMM verified every byte, its source gone');
  t.match(JSON.parse(out.trim()), { ok: true, pages: 2048, mismatchedPages: 0 });
  const summary = await ended;
  t.equal(summary.complete, true);
  t.equal(summary.bytesReceived, 0, 'no page crossed a socket');
  t.equal(summary.recovery?.source, 'image');
});

t.test(
  'restore --in-place --out onto the image itself is refused by any name (from its directory, a symlink, a hard link): the image stays byte for byte',
  async (t) => {
    const bytes = randomImage(256, 7);
    const dir = shmDir(t);
    const imagePath = writeImage(dir, bytes, 'vm.mem');
    symlinkSync(imagePath, join(dir, 'link.mem'));
    linkSync(imagePath, join(dir, 'hard.mem'));
    const { listening } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(tempDir(t), 'source.sock')}`]);
    // The README's own pair, run from the image's directory: --out vm.mem is the image.
    for (const out of ['vm.mem', 'link.mem', 'hard.mem', `${dir}/./vm.mem`]) {
      const r = await runCli(['restore', '--source', `unix:${listening.path}`, '--in-place', '--out', out], {}, dir);
      t.equal(r.code, 2, `--out ${out}: refused as a usage error`);
      t.match(r.stderr, /is the image being restored \(the same file\).*ERR_USAGE/, `--out ${out}: says why`);
      t.ok(readFileSync(imagePath).equals(bytes), `--out ${out}: the image is intact byte for byte`);
    }
    // (The source keeps its image's digest beside it: vm.mem.postcopy-sums.)
    t.same(
      readdirSync(dir)
        .filter((f) => !f.endsWith('.postcopy-sums'))
        .sort(),
      ['hard.mem', 'link.mem', 'vm.mem'],
      'nothing written beside it',
    );
    // Taken in place again, onto another existing file: replaced whole.
    const other = join(dir, 'other.mem');
    writeFileSync(other, 'an older restore');
    const copied = await runCli(['restore', '--source', `unix:${listening.path}`, '--in-place', '--out', other, '--json', '--log-level', 'warn']);
    t.equal(copied.code, 0, copied.stderr);
    t.ok(readFileSync(other).equals(bytes), 'an existing --out is replaced whole');
    t.ok(readFileSync(imagePath).equals(bytes), 'and the image is untouched');
  },
);

t.test(
  'restore --out (copy) replaces an existing file only once the restore verified: through a symlink its target; a failed restore leaves it as it was',
  async (t) => {
    const bytes = randomImage(128, 3);
    const dir = tempDir(t);
    const imagePath = writeImage(dir, bytes, 'vm.mem');
    const { listening, child } = await startServeCli(t, ['--image', imagePath, '--listen', `unix:${join(dir, 'source.sock')}`]);
    const target = join(dir, 'restored.mem');
    writeFileSync(target, 'the previous restore', { mode: 0o640 });
    symlinkSync(target, join(dir, 'latest.mem'));
    const ok = await runCli(['restore', '--source', `unix:${listening.path}`, '--out', join(dir, 'latest.mem'), '--json', '--log-level', 'warn']);
    t.equal(ok.code, 0, ok.stderr);
    t.ok(lstatSync(join(dir, 'latest.mem')).isSymbolicLink(), 'the symlink is still a symlink');
    t.ok(readFileSync(target).equals(bytes), 'its target holds the restored image');
    t.equal(statSync(target).mode & 0o777, 0o640, 'with the mode it had');
    // A copy restore onto the image the source serves: the source keeps serving what it mapped; the file ends byte-exact.
    const same = await runCli(['restore', '--source', `unix:${listening.path}`, '--out', imagePath, '--json', '--log-level', 'warn']);
    t.equal(same.code, 0, same.stderr);
    t.ok(readFileSync(imagePath).equals(bytes), 'the image, restored over itself, is byte for byte the same');
    // A restore from the image file itself, onto it (another spelling of its path): refused, like --in-place.
    const local = await runCli(['restore', '--image', imagePath, '--out', join(dir, '.', 'vm.mem')]);
    t.equal(local.code, 2, 'restore --image onto its own image is refused');
    t.ok(readFileSync(imagePath).equals(bytes), 'and the image is untouched');
    // A restore that fails (its source gone for good) writes nothing.
    child.kill('SIGKILL');
    await once(child, 'exit');
    writeFileSync(target, 'the previous restore');
    const failed = await runCli(['restore', '--source', `unix:${listening.path}`, '--out', target, '--give-up-after', '1s']);
    t.equal(failed.code, 1);
    t.equal(readFileSync(target, 'utf8'), 'the previous restore', 'the existing file is as it was');
    t.same(
      readdirSync(dir).filter((f) => f.includes('.postcopy-') && !f.endsWith('.postcopy-sums')),
      [],
      'no temporary file left beside it',
    );
  },
);
