// The page scheduler's own unit tests (test/native/page_scheduler.cc, built
// with the addon by `npx cmake-js compile`): the order pages go in (requested,
// window in units, working set, background following the last request), each
// page once, with several threads claiming at once. Each of its TAP lines is
// an assertion here.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { here } from './helpers.js';

const binary = join(here, '..', 'build', 'tests', 'page_scheduler_test');

t.test('the page scheduler yields each page once, in the order of its reasons, with concurrent claimers', async (t) => {
  t.ok(existsSync(binary), `${binary} is built (npx cmake-js compile)`);
  if (!existsSync(binary)) return;
  const run = spawnSync(binary, { encoding: 'utf8', timeout: 120_000 });
  t.equal(run.error, undefined, 'it ran');
  const lines = run.stdout.split('\n');
  const results = lines.map((l) => /^(not ok|ok) \d+ - (.*)$/.exec(l)).filter((m) => m !== null);
  const plan = lines.map((l) => /^1\.\.(\d+)$/.exec(l)).find((m) => m !== null);
  t.ok(plan, 'it printed its plan (it ran to the end)');
  t.equal(results.length, Number(plan?.[1]), 'every planned assertion reported');
  for (const [, verdict, name] of results) t.ok(verdict === 'ok', name);
  t.equal(run.status, 0, `it exits 0${run.stderr ? `: ${run.stderr}` : ''}`);
});
