// The house's floors, read from the sources: every import in lib/, client/,
// server/, bin/, bench/ and the front door (index.ts). lib/ is the ground
// floor (it imports none of the others), bench/ never imports the CLI (bin/),
// and no module reaches itself again through its imports (type-only imports
// count too: a cycle of types is a cycle of meaning).
import t from 'tap';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';

// Read from the sources alone: nothing here loads the package (or its addon).
const root = fileURLToPath(new URL('..', import.meta.url));
const FOLDERS = ['lib', 'client', 'server', 'bin', 'bench'] as const;

/** Every .ts source of the package (relative to the root), the front door first. */
function sources(): string[] {
  const files = ['index.ts'];
  const walk = (dir: string) => {
    for (const entry of readdirSync(join(root, dir), { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) files.push(path);
    }
  };
  for (const folder of FOLDERS) walk(folder);
  return files;
}

/** The specifiers a module imports: static imports and re-exports (type-only included), side-effect imports, import(). */
function importsOf(text: string): string[] {
  const code = text.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '');
  const found = new Set<string>();
  for (const m of code.matchAll(/^\s*(?:import|export)\s[^;]*?\sfrom\s+['"]([^'"]+)['"]/gm)) found.add(m[1]);
  for (const m of code.matchAll(/^\s*import\s+['"]([^'"]+)['"]/gm)) found.add(m[1]);
  for (const m of code.matchAll(/\bimport\(\s*['"]([^'"]+)['"]\s*\)/g)) found.add(m[1]);
  return [...found];
}

/** The module graph: each source to the sources it imports (relative specifiers, .js resolved to .ts). */
function graph(): Map<string, string[]> {
  const edges = new Map<string, string[]>();
  for (const file of sources()) {
    const targets: string[] = [];
    for (const spec of importsOf(readFileSync(join(root, file), 'utf8'))) {
      if (!spec.startsWith('.')) continue;
      const target = normalize(join(dirname(file), spec)).replace(/\.js$/, '.ts');
      if (!existsSync(join(root, target))) throw new Error(`${file} imports ${spec}, which is not a source (${target})`);
      targets.push(target);
    }
    edges.set(file, targets);
  }
  return edges;
}

const floor = (file: string) => (file.includes('/') ? file.slice(0, file.indexOf('/')) : '.');

/** Strongly connected components of more than one module (or a module importing itself), each with one cycle through it. */
function cycles(edges: Map<string, string[]>): { members: string[]; cycle: string[] }[] {
  let next = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: { members: string[]; cycle: string[] }[] = [];
  const connect = (v: string) => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    onStack.add(v);
    for (const w of edges.get(v) ?? []) {
      if (!index.has(w)) {
        connect(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) !== index.get(v)) return;
    const members: string[] = [];
    let w: string;
    do {
      w = stack.pop()!;
      onStack.delete(w);
      members.push(w);
    } while (w !== v);
    if (members.length > 1 || (edges.get(v) ?? []).includes(v)) found.push({ members: members.sort(), cycle: cycleThrough(v, new Set(members), edges) });
  };
  for (const v of edges.keys()) if (!index.has(v)) connect(v);
  return found;
}

/** One path from `start` back to itself inside `within` (breadth first: the shortest). */
function cycleThrough(start: string, within: Set<string>, edges: Map<string, string[]>): string[] {
  const from = new Map<string, string>();
  const queue = [start];
  while (queue.length) {
    const v = queue.shift()!;
    for (const w of edges.get(v) ?? []) {
      if (!within.has(w)) continue;
      if (w === start) {
        const path = [start];
        for (let at = v; at !== start; at = from.get(at)!) path.splice(1, 0, at);
        return [...path, start];
      }
      if (!from.has(w)) {
        from.set(w, v);
        queue.push(w);
      }
    }
  }
  return [start];
}

t.test('the import parser sees every kind of import', async (t) => {
  const text = [
    "import { a } from './a.js';",
    "import type { B } from '../b.js';",
    'import {\n  c,\n  d,\n} from "./c.js";',
    "export { e } from './e.js';",
    "export * from './f.js';",
    "import './g.js';",
    "const h = await import('./h.js');",
    "// import { no } from './comment.js';",
    "/* import { no } from './block.js'; */",
  ].join('\n');
  t.same(importsOf(text).sort(), ['../b.js', './a.js', './c.js', './e.js', './f.js', './g.js', './h.js']);
});

t.test('the cycle finder names each cycle and only cycles', async (t) => {
  const edges = new Map([
    ['a', ['b']],
    ['b', ['c']],
    ['c', ['a', 'd']],
    ['d', []],
    ['e', ['e']],
  ]);
  t.same(
    cycles(edges).map((c) => c.cycle),
    [
      ['a', 'b', 'c', 'a'],
      ['e', 'e'],
    ],
  );
});

const edges = graph();

t.test('the graph covers every floor and the front door', async (t) => {
  for (const f of [...FOLDERS, '.'])
    t.ok(
      [...edges.keys()].some((file) => floor(file) === f),
      `modules in ${f}/`,
    );
  t.ok(edges.get('index.ts')!.length > 10, 'the front door re-exports the library');
});

t.test('lib/ imports nothing above it (client/, server/, bin/, bench/, the front door)', async (t) => {
  const upward = [...edges].flatMap(([file, targets]) =>
    floor(file) === 'lib' ? targets.filter((to) => floor(to) !== 'lib').map((to) => `${file} -> ${to}`) : [],
  );
  t.same(upward, [], 'no import from lib/ upward');
});

t.test('bench/ does not import the CLI (bin/); the front door is imported by no module of the package', async (t) => {
  const wrong = [...edges].flatMap(([file, targets]) =>
    targets.filter((to) => (floor(file) === 'bench' && floor(to) === 'bin') || to === 'index.ts').map((to) => `${file} -> ${to}`),
  );
  t.same(wrong, []);
});

t.test('no import cycle', async (t) => {
  const found = cycles(edges).map((c) => c.cycle.join(' -> '));
  t.same(found, [], found.length ? `import cycles:\n  ${found.join('\n  ')}` : 'no cycle');
});
