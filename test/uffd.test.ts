import t from 'tap';
import { spawn } from 'node:child_process';
import { closeSync, ftruncateSync } from 'node:fs';
import { Userfaultfd, availableFeatures, PAGE_SIZE } from '../lib/uffd.js';
import { mapAnonymous, mapFile, memfdCreate } from '../lib/memory.js';
import { touchPages, shuffledOrder } from '../lib/workload.js';
import { PAGE, randomImage, serveFaultsFromJs } from './helpers.js';

t.test('the kernel offers every feature, newer ones included, by name', async (t) => {
  const available = availableFeatures();
  for (const name of ['EVENT_REMOVE', 'MINOR_SHMEM', 'THREAD_ID', 'WP_ASYNC', 'WP_UNPOPULATED', 'POISON', 'MOVE'] as const) {
    t.ok(available.includes(name), `${name} is offered`);
  }
});

t.test('handshake grants the requested features and names the fd ioctls', async (t) => {
  const uffd = Userfaultfd.open();
  t.teardown(() => uffd.close());
  t.equal(uffd.openedVia, 'syscall');
  const hs = uffd.handshake(['THREAD_ID', 'EVENT_REMOVE', 'MOVE']);
  t.same(hs.features.sort(), ['EVENT_REMOVE', 'MOVE', 'THREAD_ID']);
  t.ok(hs.ioctls.includes('REGISTER') && hs.ioctls.includes('UNREGISTER') && hs.ioctls.includes('API'));
  t.throws(() => uffd.handshake(['NOT_A_FEATURE' as never]), { code: 'ERR_INVALID_ARG_VALUE' });
});

t.test('register reports the ioctls allowed on the range, per mode', async (t) => {
  const uffd = Userfaultfd.open();
  const region = mapAnonymous(4 * PAGE);
  t.teardown(() => {
    uffd.close();
    region.unmap();
  });
  uffd.handshake(['MOVE', 'POISON']);
  const ioctls = uffd.register(region.address, region.length, ['missing', 'wp']);
  for (const name of ['COPY', 'ZEROPAGE', 'WAKE', 'WRITEPROTECT', 'MOVE', 'POISON'] as const) t.ok(ioctls.includes(name), `${name} allowed`);
  uffd.unregister(region.address, region.length);
  t.throws(() => uffd.zeroPage(region.address, PAGE), { code: 'ENOENT', errno: -2, syscall: 'ioctl', request: 'UFFDIO_ZEROPAGE' });
});

t.test('a missing fault raised in another thread is resolved by COPY with the right bytes', async (t) => {
  const pages = 64;
  const image = randomImage(pages);
  const uffd = Userfaultfd.open({ nonBlocking: true });
  const region = mapAnonymous(pages * PAGE);
  t.teardown(() => {
    uffd.close();
    region.unmap();
  });
  uffd.handshake(['THREAD_ID']);
  uffd.register(region.address, region.length, ['missing']);
  const order = shuffledOrder(pages, 7);
  const touching = touchPages(region.address, pages, order);
  const faults = await serveFaultsFromJs(uffd, region.address, image, touching);
  const touched = await touching;
  t.equal(faults, pages, 'one fault per page');
  for (let k = 0; k < pages; k++) t.equal(touched.firstBytes[k], image[order[k] * PAGE], `page ${order[k]} first byte`);
  t.ok(region.buffer().equals(image), 'the whole region equals the image');
});

t.test('fault events name the faulting thread and whether it wrote', async (t) => {
  const uffd = Userfaultfd.open({ nonBlocking: true });
  const region = mapAnonymous(PAGE);
  t.teardown(() => {
    uffd.close();
    region.unmap();
  });
  uffd.handshake(['THREAD_ID']);
  uffd.register(region.address, region.length);
  const touching = touchPages(region.address, 1, Uint32Array.of(0), { write: true });
  t.ok(await uffd.waitReadable(5000));
  const [ev] = uffd.readEvents();
  t.equal(ev.type, 'pagefault');
  if (ev.type !== 'pagefault') return;
  t.equal(ev.address, region.address);
  t.equal(ev.write, true);
  t.ok(ev.threadId > 0 && ev.threadId !== process.pid, 'a thread other than the main one');
  t.same(uffd.zeroPage(region.address, PAGE), { bytes: PAGE, code: null });
  await touching;
});

t.test('ZEROPAGE maps zeros; a second COPY of the same page reports EEXIST', async (t) => {
  const uffd = Userfaultfd.open({ nonBlocking: true });
  const region = mapAnonymous(4 * PAGE);
  t.teardown(() => {
    uffd.close();
    region.unmap();
  });
  uffd.handshake();
  uffd.register(region.address, region.length);
  t.same(uffd.zeroPage(region.address, 2 * PAGE), { bytes: 2 * PAGE, code: null });
  const data = Buffer.alloc(2 * PAGE, 0xab);
  t.same(uffd.copy(region.address + 2 * PAGE, data), { bytes: 2 * PAGE, code: null });
  const again = uffd.copy(region.address + PAGE, data);
  t.equal(again.code, 'EEXIST');
  t.equal(again.bytes, 0);
  const view = region.buffer();
  t.ok(
    view.subarray(0, 2 * PAGE).every((b) => b === 0),
    'zero pages read as zeros',
  );
  t.ok(
    view.subarray(2 * PAGE).every((b) => b === 0xab),
    'copied pages hold the data',
  );
});

t.test('a MINOR fault on a memfd mapping is resolved by CONTINUE', async (t) => {
  const fd = memfdCreate('minor-test');
  ftruncateSync(fd, 2 * PAGE);
  const pageCache = mapFile(fd, 2 * PAGE); // fills the page cache
  const region = mapFile(fd, 2 * PAGE); // the registered view
  const uffd = Userfaultfd.open({ nonBlocking: true });
  t.teardown(() => {
    uffd.close();
    region.unmap();
    pageCache.unmap();
    closeSync(fd);
  });
  pageCache.buffer().fill(0x5a);
  uffd.handshake(['MINOR_SHMEM']);
  const ioctls = uffd.register(region.address, region.length, ['minor']);
  t.ok(ioctls.includes('CONTINUE'));
  const touching = touchPages(region.address, 2, Uint32Array.of(1, 0));
  let continued = 0;
  while (continued < 2) {
    t.ok(await uffd.waitReadable(5000), 'a fault arrives');
    for (const ev of uffd.readEvents()) {
      if (ev.type !== 'pagefault') continue;
      t.equal(ev.minor, true, 'flagged minor');
      t.same(uffd.continue(ev.address - (ev.address % PAGE), PAGE), { bytes: PAGE, code: null });
      continued++;
    }
  }
  const touched = await touching;
  t.same([...touched.firstBytes], [0x5a, 0x5a]);
});

t.test('a write to a write-protected page faults (wp) and goes on once un-protected', async (t) => {
  const uffd = Userfaultfd.open({ nonBlocking: true });
  const region = mapAnonymous(PAGE);
  t.teardown(() => {
    uffd.close();
    region.unmap();
  });
  uffd.handshake(['PAGEFAULT_FLAG_WP']);
  uffd.register(region.address, PAGE, ['missing', 'wp']);
  uffd.copy(region.address, Buffer.alloc(PAGE, 1), { writeProtect: true });
  const touching = touchPages(region.address, 1, Uint32Array.of(0), { write: true });
  t.ok(await uffd.waitReadable(5000));
  const [ev] = uffd.readEvents();
  t.equal(ev.type, 'pagefault');
  if (ev.type === 'pagefault') t.same([ev.wp, ev.write], [true, true]);
  uffd.writeProtect(region.address, PAGE, false);
  const touched = await touching;
  t.equal(touched.firstBytes[0], 1);
});

t.test('MOVE moves pages into the registered range without copying', async (t) => {
  const uffd = Userfaultfd.open({ nonBlocking: true });
  const region = mapAnonymous(4 * PAGE);
  const source = mapAnonymous(4 * PAGE);
  t.teardown(() => {
    uffd.close();
    region.unmap();
    source.unmap();
  });
  source.buffer().fill(0x77);
  uffd.handshake(['MOVE']);
  uffd.register(region.address, region.length);
  const touching = touchPages(region.address, 4, Uint32Array.of(2));
  t.ok(await uffd.waitReadable(5000));
  const [ev] = uffd.readEvents();
  t.equal(ev.type === 'pagefault' && ev.address, region.address + 2 * PAGE);
  t.same(uffd.move(region.address, source.address, 4 * PAGE), { bytes: 4 * PAGE, code: null });
  t.equal((await touching).firstBytes[0], 0x77, 'the faulting thread sees the moved page');
  t.ok(
    region.buffer().every((b) => b === 0x77),
    'every page arrived',
  );
  t.ok(
    source.buffer().every((b) => b === 0),
    'the source pages are gone (read as zeros)',
  );
});

t.test('POISON makes a later touch of the page raise SIGBUS', async (t) => {
  const script = `
    import { createRequire } from 'node:module';
    const native = createRequire(${JSON.stringify(new URL('../package.json', import.meta.url).pathname)})('#addon');
    const { fd } = native.uffdOpen(native.uffdConstants.O_CLOEXEC);
    native.uffdApi(fd, 1 << 14);
    const region = new native.Mapping(8192, 3, 0x22, -1, 0, 0);
    native.uffdRegister(fd, region.address, 8192, 1);
    const poisoned = native.uffdPoison(fd, region.address + 4096, 4096, 0);
    const zeroed = native.uffdZeroPage(fd, region.address, 4096, 0);
    console.log(JSON.stringify({ poisoned, zeroed }));
    await native.touchPages(region.address, 4096, Uint32Array.of(0), false);
    console.log('first page readable');
    await native.touchPages(region.address, 4096, Uint32Array.of(1), false);
    console.log('poisoned page readable');`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env.PATH } });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const [code, signal] = await new Promise<[number | null, string | null]>((resolve) => child.on('close', (c, s) => resolve([c, s])));
  const lines = out.trim().split('\n');
  t.same(JSON.parse(lines[0]), { poisoned: { bytes: PAGE, code: null }, zeroed: { bytes: PAGE, code: null } });
  t.equal(lines[1], 'first page readable');
  t.equal(lines.length, 2, 'nothing printed after touching the poisoned page');
  t.same([code, signal], [null, 'SIGBUS']);
});

t.test('bad arguments are refused in TypeScript with stable codes', async (t) => {
  const uffd = Userfaultfd.open();
  t.teardown(() => uffd.close());
  t.throws(() => uffd.register('0x1000' as never, PAGE), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' });
  t.throws(() => uffd.register(PAGE + 1, PAGE), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => uffd.register(PAGE, 0), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => uffd.register(PAGE, PAGE, ['sideways' as never]), { code: 'ERR_INVALID_ARG_VALUE' });
  t.throws(() => uffd.copy(PAGE, 'bytes' as never), { name: 'TypeError', code: 'ERR_INVALID_ARG_TYPE' });
  t.throws(() => uffd.copy(PAGE, Buffer.alloc(PAGE), { sourceOffset: PAGE, length: PAGE }), { name: 'RangeError', code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => uffd.readEvents(0), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => Userfaultfd.open({ nonBlocking: 'yes' as never }), { code: 'ERR_INVALID_ARG_TYPE' });
  uffd.close();
  t.throws(() => uffd.readEvents(), { code: 'ERR_UFFD_CLOSED' });
});

t.test('kernel errors carry code, errno and syscall like Node fs errors', async (t) => {
  const uffd = Userfaultfd.open();
  t.teardown(() => uffd.close());
  t.throws(() => uffd.register(PAGE, PAGE), { code: 'EINVAL', message: /UFFDIO_REGISTER/ }, 'register before the handshake');
  uffd.handshake();
  const region = mapAnonymous(PAGE);
  region.unmap();
  const err = (() => {
    try {
      uffd.register(region.address, PAGE);
    } catch (e) {
      return e as NodeJS.ErrnoException;
    }
  })();
  t.ok(err instanceof Error);
  t.match(err, { code: /^E[A-Z]+$/, syscall: 'ioctl', request: 'UFFDIO_REGISTER' });
  t.ok(typeof err?.errno === 'number' && err.errno < 0, 'negative errno, as Node reports it');
  t.equal(PAGE_SIZE, PAGE);
});

t.test('an unprivileged process falls back to a user-mode-only userfaultfd', async (t) => {
  const script = `
    import { createRequire } from 'node:module';
    const native = createRequire(${JSON.stringify(new URL('../package.json', import.meta.url).pathname)})('#addon');
    const out = native.uffdOpen(native.uffdConstants.O_CLOEXEC);
    console.log(JSON.stringify({ via: out.via, uid: process.getuid() }));`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
    uid: 65534,
    gid: 65534,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { PATH: process.env.PATH },
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  const code = await new Promise((resolve) => child.on('close', resolve));
  t.equal(code, 0, err);
  t.same(JSON.parse(out), { via: 'syscall-user-mode-only', uid: 65534 });
});
