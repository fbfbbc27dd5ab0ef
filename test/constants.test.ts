// Every wire and stream constant is defined once per language: the data
// channels in lib/wire.ts (and lib/limits.ts) and addon/wire.h, QEMU's stream
// in lib/qemu-stream.ts and addon/qemu_stream.h. This compares the two
// languages constant by constant, through the values the addon itself was
// compiled with (native.constants(), addon/constants.cc): a constant added on
// one side alone, or with another value, fails here.
import t, { type Test } from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { native } from '../lib/native.js';
import { Kind, PAGE_REQUEST_BYTES, Reason, RUN_HEADER_BYTES } from '../lib/wire.js';
import { MAX_RUN_BYTES } from '../lib/limits.js';
import { Command, RamFlag, ReturnPath, Section, Stream } from '../lib/qemu-stream.js';
import { here } from './helpers.js';

const constants = native.constants();

/** A C++ name to its TypeScript key: the group's prefix off, the first letter lowered (kPostcopyRun -> postcopyRun). */
function tsKey(cxx: string, prefix: string): string {
  if (!cxx.startsWith(prefix)) throw new Error(`${cxx} does not start with its group's prefix ${prefix}`);
  const rest = cxx.slice(prefix.length);
  return rest[0].toLowerCase() + rest.slice(1);
}

/** Compares one native group with its TypeScript table, both ways. */
function compare(t: Test, what: string, nativeGroup: Record<string, number>, prefix: string, table: Record<string, number>) {
  const fromNative = Object.fromEntries(Object.entries(nativeGroup).map(([name, value]) => [tsKey(name, prefix), value]));
  t.same(Object.keys(fromNative).sort(), Object.keys(table).sort(), `${what}: the same constants on both sides`);
  for (const [key, value] of Object.entries(table)) t.equal(fromNative[key], value, `${what}.${key} = 0x${value.toString(16)} in both languages`);
}

t.test('data channels: run kinds and reasons (lib/wire.ts and addon/wire.h)', async (t) => {
  compare(t, 'Kind', constants.wire.Kind, 'k', Kind);
  compare(t, 'Reason', constants.wire.Reason, 'k', Reason);
});

t.test('data channels: the frame sizes and the largest run', async (t) => {
  t.same(constants.wire.sizes, { PageRequest: PAGE_REQUEST_BYTES, RunHeader: RUN_HEADER_BYTES, kMaxRunBytes: MAX_RUN_BYTES });
});

t.test("QEMU's stream: header, sections, RAM flags, commands, return path (lib/qemu-stream.ts and addon/qemu_stream.h)", async (t) => {
  compare(t, 'Stream', constants.qemu.Stream, 'kStream', Stream);
  compare(t, 'Section', constants.qemu.Section, 'kSection', Section);
  compare(t, 'RamFlag', constants.qemu.RamFlag, 'kFlag', RamFlag);
  compare(t, 'Command', constants.qemu.Command, 'kCmd', Command);
  compare(t, 'ReturnPath', constants.qemu.ReturnPath, 'kRp', ReturnPath);
});

t.test('every constant the native headers declare is among those compared', async (t) => {
  const exported = new Set(Object.values({ ...constants.wire, ...constants.qemu }).flatMap((group) => Object.keys(group)));
  for (const header of ['wire.h', 'qemu_stream.h']) {
    const text = readFileSync(join(here, '..', 'addon', header), 'utf8');
    const declared = [
      ...[...text.matchAll(/constexpr\s+\w+\s+(k\w+)\s*=/g)].map((m) => m[1]),
      ...[...text.matchAll(/enum\s+\w+\s*:\s*\w+\s*\{([^}]*)\}/g)].flatMap((m) => [...m[1].matchAll(/(k\w+)\s*=/g)].map((e) => e[1])),
    ];
    t.ok(declared.length >= 10, `${header} declares ${declared.length} constants`);
    t.same(
      declared.filter((name) => !exported.has(name)),
      [],
      `every constant of addon/${header} is exported by addon/constants.cc and so compared`,
    );
  }
});
