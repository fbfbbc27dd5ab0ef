// The package as a user gets it: imported by its name from another directory,
// running docs/API.md's example as it stands, and shipping only what it needs.
import t from 'tap';
import { execFileSync, spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { ensureBuilt, here, tempDir } from './helpers.js';

const root = join(here, '..');
/** The only files of test/ the package ships: the VMM fixture (to try handle with) and the QEMU bench's guest. */
const SHIPPED_FROM_TEST = ['test/fixtures/vmm.c', 'test/guest/guest-mem.c', 'dist/test/guest/build.js', 'dist/test/guest/build.d.ts'];

t.test("docs/API.md's example runs against the package imported by its name", async (t) => {
  ensureBuilt();
  const doc = readFileSync(join(root, 'docs', 'API.md'), 'utf8');
  const example = /```js\n([\s\S]*?)```/.exec(doc)?.[1];
  t.ok(example?.includes("from 'uffd-postcopy'"), 'the example imports the package by its name');
  // A project of the user's own, with the package in its node_modules.
  const dir = tempDir(t);
  mkdirSync(join(dir, 'node_modules'));
  symlinkSync(root, join(dir, 'node_modules', 'uffd-postcopy'));
  writeFileSync(join(dir, 'example.mjs'), example as string);
  const run = spawnSync(process.execPath, [join(dir, 'example.mjs')], { cwd: dir, encoding: 'utf8', timeout: 120_000 });
  t.equal(run.status, 0, run.stderr);
  const out = JSON.parse(run.stdout.trim());
  t.match(out, { digestMatch: true, pages: 4096 });
  t.ok(out.faults > 0, `pages came on demand (${out.faults} faults)`);
});

t.test('the package ships the library, the CLI and the addon sources, not the tests or the benchmark results', async (t) => {
  const [pack] = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: root, encoding: 'utf8' })) as [
    { files: { path: string }[] },
  ];
  const files = pack.files.map((f) => f.path);
  for (const needed of [
    'dist/index.js',
    'dist/index.d.ts',
    'dist/bin/postcopy.js',
    'addon/fault_engine.cc',
    'CMakeLists.txt',
    'test/fixtures/vmm.c',
    'docs/API.md',
    'package.json',
    // What the benchmarks need when run from the package: the floor's source, their README, the QEMU bench's test guest.
    'bench/floor.c',
    'bench/README.md',
    'dist/test/guest/build.js',
    'test/guest/guest-mem.c',
  ]) {
    t.ok(files.includes(needed), `ships ${needed}`);
  }
  t.same(
    files.filter((f) => (f.startsWith('test/') || f.startsWith('dist/test/')) && !SHIPPED_FROM_TEST.includes(f)),
    [],
    'no test files',
  );
  t.same(
    files.filter((f) => f.startsWith('docs/benchmarks/') || f.endsWith('.map')),
    [],
    'no benchmark results, no source maps',
  );
});

/** Every module `entry` reaches through static imports (dynamic import() is left out: it loads on demand), and the packages among them. */
function staticImports(entry: string): { modules: Set<string>; packages: Set<string> } {
  const modules = new Set<string>();
  const packages = new Set<string>();
  const walk = (file: string) => {
    if (modules.has(file)) return;
    modules.add(file);
    const text = readFileSync(file, 'utf8');
    for (const m of text.matchAll(/^\s*(?:import|export)\s[^;]*?\sfrom\s+'([^']+)'/gm)) {
      if (/^import\s+type\s/.test(m[0].trim())) continue;
      if (m[1].startsWith('.')) walk(join(dirname(file), m[1]));
      else packages.add(m[1]);
    }
  };
  walk(entry);
  return { modules, packages };
}

t.test('the CLI loads the plotting libraries only for the bench: every other command starts without them', async (t) => {
  ensureBuilt();
  const { modules, packages } = staticImports(join(root, 'dist', 'bin', 'run.js'));
  t.ok(modules.size > 5, `${modules.size} modules reached`);
  t.notOk(packages.has('vega') || packages.has('vega-lite'), `no plotting library among ${[...packages].sort().join(', ')}`);
});

t.test('--version and --help load no command, no addon and no library: text alone', async (t) => {
  ensureBuilt();
  const { modules, packages } = staticImports(join(root, 'dist', 'bin', 'postcopy.js'));
  t.same(
    [...modules].map((m) => m.slice(join(root, 'dist').length + 1)).sort(),
    ['bin/postcopy.js', 'bin/usage.js', 'lib/package-root.js'],
    'the entry, the usage texts and where the version is read',
  );
  t.same(
    [...packages].filter((p) => !p.startsWith('node:')),
    [],
    'and no package',
  );
});

t.test('a library user installs no plotting library: vega and vega-lite are optional peers, which the bench uses when they are there', async (t) => {
  const manifest = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
  for (const name of ['vega', 'vega-lite']) {
    t.notOk(manifest.dependencies?.[name], `${name} is not a dependency`);
    t.ok(manifest.peerDependencies?.[name], `${name} is a peer`);
    t.same(manifest.peerDependenciesMeta?.[name], { optional: true }, `${name} is optional`);
    t.ok(manifest.devDependencies?.[name], `${name} is installed for this project's own bench and tests`);
  }
});

t.test('installed with scripts off (no addon built): --help and --version work, every command says in one line how to build it', async (t) => {
  ensureBuilt();
  // The package as `npm install --ignore-scripts` leaves it: the compiled CLI and library, no build/ folder.
  const dir = tempDir(t);
  const pkg = join(dir, 'node_modules', 'uffd-postcopy');
  mkdirSync(pkg, { recursive: true });
  cpSync(join(root, 'dist'), join(pkg, 'dist'), { recursive: true });
  cpSync(join(root, 'package.json'), join(pkg, 'package.json'));
  symlinkSync(join(root, 'node_modules'), join(pkg, 'node_modules'));
  const cli = join(pkg, 'dist', 'bin', 'postcopy.js');
  const run = (...args: string[]) => spawnSync(process.execPath, [cli, ...args], { cwd: dir, encoding: 'utf8', timeout: 60_000 });
  const version = run('--version');
  t.equal(version.status, 0, version.stderr);
  t.match(version.stdout, /^uffd-postcopy \d+\.\d+\.\d+\n$/);
  const help = run('serve', '--help');
  t.equal(help.status, 0, help.stderr);
  t.match(help.stdout, /^postcopy serve --image FILE/);
  for (const args of [
    ['restore', '--source', 'unix:/nowhere.sock', '--log-format', 'pretty'],
    ['serve', '--image', cli, '--listen', `unix:${join(dir, 's.sock')}`, '--log-format', 'pretty'],
  ]) {
    const r = run(...args);
    t.equal(r.status, 1, `${args[0]}: exit 1`);
    t.equal(r.stderr.trim().split('\n').length, 1, `${args[0]}: one line, no stack trace`);
    t.match(r.stderr, /the native addon .* is not built: build it with "npm rebuild uffd-postcopy".*ERR_ADDON_NOT_BUILT/);
  }
  // The library imports (its types and pure helpers need no addon); using native code says the same.
  const lib = spawnSync(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      "import('uffd-postcopy').then(async (m) => { console.log(typeof m.readToken, typeof m.defaultTokenPath); try { m.mapAnonymous(4096); } catch (e) { console.log(e.code); } })",
    ],
    { cwd: dir, encoding: 'utf8', timeout: 60_000 },
  );
  t.equal(lib.status, 0, lib.stderr);
  t.equal(lib.stdout.trim(), 'function function\nERR_ADDON_NOT_BUILT', 'the token helpers are exported; native code says how to build it');
});

t.test(
  'the packed tarball installed in another directory: the CLI and the benchmarks run, the QEMU bench finds its guest, no plotting library comes along',
  async (t) => {
    ensureBuilt();
    const dir = tempDir(t);
    const packed = JSON.parse(execFileSync('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', dir], { cwd: root, encoding: 'utf8' })) as [
      { filename: string },
    ];
    const tarball = join(dir, packed[0].filename);
    const app = join(dir, 'app');
    mkdirSync(app);
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true }));
    // As a user installs it: the addon compiled by its install script (dependencies from npm's cache when it has them).
    const install = spawnSync('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', tarball], { cwd: app, encoding: 'utf8', timeout: 600_000 });
    t.equal(install.status, 0, install.stderr);
    const pkg = join(app, 'node_modules', 'uffd-postcopy');
    t.ok(existsSync(join(pkg, 'build', 'Release', 'uffd_postcopy.node')), 'the addon was built');
    t.notOk(existsSync(join(app, 'node_modules', 'vega')) || existsSync(join(app, 'node_modules', 'vega-lite')), 'vega and vega-lite are not installed');
    const cli = (...args: string[]) =>
      spawnSync(join(app, 'node_modules', '.bin', 'postcopy'), args, {
        cwd: app,
        encoding: 'utf8',
        timeout: 300_000,
        env: { ...process.env, POSTCOPY_LOG_LEVEL: 'error' },
      });
    const version = cli('--version');
    t.equal(version.status, 0, version.stderr);
    const latency = cli('bench', 'latency', '--pages', '256', '--rounds', '1', '--transport', 'unix');
    t.equal(latency.status, 0, latency.stderr);
    t.match(
      latency.stdout,
      /\| latency \| unix \| fault p50 \| [\d.]+ µs \| [\d.]+ µs \(unix\)/,
      'bench latency runs beside the floor, built from the shipped bench/floor.c',
    );
    t.notOk(existsSync(join(pkg, 'reports')), 'and writes nothing inside the package');
    // bench qemu loads its guest's builder from the package (booting QEMU is the QEMU test's job).
    const guest = spawnSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `import(${JSON.stringify(join(pkg, 'dist', 'test', 'guest', 'build.js'))}).then((m) => console.log(Object.keys(m).length > 0))`,
      ],
      {
        encoding: 'utf8',
        timeout: 60_000,
      },
    );
    t.equal(guest.stdout.trim(), 'true', guest.stderr);
  },
);
