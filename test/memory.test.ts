import t from 'tap';
import { closeSync, openSync, writeSync, ftruncateSync, fstatSync } from 'node:fs';
import { join } from 'node:path';
import { mapAnonymous, mapFile, memfdCreate, addSeals, getSeals, madvise, punchHole, fileExtents, PAGE_SIZE } from '../lib/memory.js';
import { PAGE, tempDir } from './helpers.js';

t.test('an anonymous mapping gives a zero-copy view', async (t) => {
  const m = mapAnonymous(4 * PAGE);
  t.teardown(() => m.unmap());
  t.equal(m.length, 4 * PAGE);
  t.equal(m.address % PAGE_SIZE, 0);
  const a = m.buffer();
  const b = m.buffer(PAGE, PAGE);
  a.fill(9, PAGE, 2 * PAGE);
  t.ok(
    b.every((x) => x === 9),
    'a second view sees writes through the first',
  );
  t.throws(() => m.buffer(0, 5 * PAGE), { code: 'ERR_OUT_OF_RANGE' });
});

t.test('after unmap, views are detached and new ones refused; never a segfault', async (t) => {
  const m = mapAnonymous(2 * PAGE);
  const view = m.buffer();
  view[0] = 1;
  m.unmap();
  t.equal(m.mapped, false);
  t.equal(view.length, 0, 'the old view is now empty');
  t.equal(view[0], undefined, 'reading it gives nothing');
  t.throws(() => m.buffer(), { code: 'ERR_MAPPING_UNMAPPED' });
  m.unmap(); // a second unmap is harmless
});

t.test('a view moved to another ArrayBuffer never reaches the mapping after unmap', async (t) => {
  const m = mapAnonymous(2 * PAGE);
  const view = m.buffer();
  view.fill(7);
  const moved = new Uint8Array(structuredClone(view.buffer, { transfer: [view.buffer as ArrayBuffer] }));
  moved[0] = 9;
  const shared = m.buffer()[0] === 9; // Node 20 copies external memory on transfer; others may move it
  m.unmap();
  t.equal(moved.length, 2 * PAGE);
  if (shared)
    t.ok(
      moved.every((b) => b === 0),
      'a moved view reads fresh zero pages: the addresses are held, never reused',
    );
  else t.ok(moved[0] === 9 && moved.subarray(1).every((b) => b === 7), 'the moved view is a private copy, untouched by unmap');
});

t.test('mapping at a given address refuses to replace an existing mapping', async (t) => {
  const first = mapAnonymous(2 * PAGE);
  t.teardown(() => first.unmap());
  const err = (() => {
    try {
      mapAnonymous(PAGE, { address: first.address });
    } catch (e) {
      return e as NodeJS.ErrnoException;
    }
  })();
  t.match(err, { code: 'EEXIST', syscall: 'mmap' });
  const freeAt = first.address + PAGE;
  first.unmap();
  const placed = mapAnonymous(PAGE, { address: freeAt });
  t.equal(placed.address, freeAt);
  placed.unmap();
});

t.test('memfd with seals: shared mappings see each other, seals hold', async (t) => {
  const fd = memfdCreate('sealed', { allowSealing: true });
  t.teardown(() => closeSync(fd));
  ftruncateSync(fd, 2 * PAGE);
  const writer = mapFile(fd, 2 * PAGE);
  const reader = mapFile(fd, 2 * PAGE, { readOnly: true });
  writer.buffer().write('hello', PAGE);
  t.equal(reader.buffer(PAGE, 5).toString(), 'hello');
  addSeals(fd, ['shrink', 'grow']);
  t.same(getSeals(fd).sort(), ['grow', 'shrink']);
  t.throws(() => ftruncateSync(fd, PAGE), { code: 'EPERM' });
  writer.unmap();
  reader.unmap();
  t.throws(() => addSeals(fd, ['sideways' as never]), { code: 'ERR_INVALID_ARG_VALUE' });
  t.throws(() => mapFile(fd, 4 * PAGE), { code: 'ERR_OUT_OF_RANGE' }, 'past the end of the file would SIGBUS on touch');
});

t.test('a memfd without sealing refuses seals with EPERM', async (t) => {
  const fd = memfdCreate('unsealed');
  t.teardown(() => closeSync(fd));
  t.throws(() => addSeals(fd, ['grow']), { code: 'EPERM', syscall: 'fcntl', request: 'F_ADD_SEALS' });
});

t.test('madvise DONTNEED drops private pages; POPULATE_WRITE fills them', async (t) => {
  const m = mapAnonymous(4 * PAGE);
  t.teardown(() => m.unmap());
  m.buffer().fill(3);
  madvise(m, PAGE, 2 * PAGE, 'dontneed');
  const v = m.buffer();
  t.same([v[0], v[PAGE], v[2 * PAGE], v[3 * PAGE]], [3, 0, 0, 3]);
  madvise(m, 0, 4 * PAGE, 'populate-write');
  madvise(m, 0, 4 * PAGE, 'hugepage');
  madvise(m, 0, 4 * PAGE, 'nohugepage');
  t.throws(() => madvise(m, 0, 8 * PAGE, 'dontneed'), { code: 'ERR_OUT_OF_RANGE' });
  t.throws(() => madvise(m, 0, PAGE, 'forget' as never), { code: 'ERR_INVALID_ARG_VALUE' });
});

t.test('MADV_REMOVE frees shared memory backing', async (t) => {
  const fd = memfdCreate('remove');
  t.teardown(() => closeSync(fd));
  ftruncateSync(fd, 2 * PAGE);
  const m = mapFile(fd, 2 * PAGE);
  m.buffer().fill(8);
  madvise(m, 0, PAGE, 'remove');
  t.same([m.buffer()[0], m.buffer()[PAGE]], [0, 8]);
  m.unmap();
});

t.test('punched holes show up as hole extents; data extents as data', async (t) => {
  const path = join(tempDir(t), 'sparse.img');
  const fd = openSync(path, 'w+');
  t.teardown(() => closeSync(fd));
  writeSync(fd, Buffer.alloc(64 * PAGE, 1), 0, 64 * PAGE, 0);
  punchHole(fd, 16 * PAGE, 16 * PAGE);
  ftruncateSync(fd, 128 * PAGE); // a tail hole too
  t.equal(fstatSync(fd).size, 128 * PAGE, 'punching keeps the size');
  const extents = fileExtents(fd);
  t.same(extents, [
    { offset: 0, length: 16 * PAGE, data: true },
    { offset: 16 * PAGE, length: 16 * PAGE, data: false },
    { offset: 32 * PAGE, length: 32 * PAGE, data: true },
    { offset: 64 * PAGE, length: 64 * PAGE, data: false },
  ]);
  t.throws(() => punchHole(fd, -1, PAGE), { code: 'ERR_OUT_OF_RANGE' });
});
