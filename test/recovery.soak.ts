// The recovery soak: a thousand random cut points (npm run soak), each a
// restore that must end byte-exact by itself. Not part of `npm test`.
//   SOAK_CUTS=1000         how many cut points
//   RECOVERY_SEED=N        replay a run
//   SOAK_DETECTION=default detect with the shipped defaults (1 s heartbeats,
//                          5 s of silence) instead of the fast test settings
// Prints one JSON line: cut points, faults fired, resumes, and how long
// detection (fault to pause) and resumption (pause to running) took, by fault.
import t from 'tap';
import { readdirSync } from 'node:fs';
import { CUT_CASES, cutOffset, restoreThroughCut, seededRandom } from './cut-points.js';
import { FAST_HEARTBEAT, FAST_RECOVERY, randomImage } from './helpers.js';
import { DEFAULT_HEARTBEAT } from '../lib/protocol.js';
import type { RecoveryOptions } from '../client/session.js';

const cuts = Number(process.env.SOAK_CUTS ?? 1000);
const seed = Number(process.env.RECOVERY_SEED ?? Date.now() % 1e9);
const defaults = process.env.SOAK_DETECTION === 'default';
const recovery: RecoveryOptions = defaults ? {} : FAST_RECOVERY;
const sourceHeartbeat = defaults ? DEFAULT_HEARTBEAT : FAST_HEARTBEAT;
const random = seededRandom(seed);
t.comment(`RECOVERY_SEED=${seed} SOAK_CUTS=${cuts} detection=${defaults ? 'default' : 'fast'}`);

const quantile = (xs: number[], q: number) => (xs.length ? [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))] : null);

t.test('soak', async (t) => {
  const pages = 1024;
  const bytes = randomImage(pages, 7);
  const fds = readdirSync('/proc/self/fd').length;
  const detect: Record<string, number[]> = {};
  const resume: Record<string, number[]> = {};
  let fired = 0;
  let resumes = 0;
  let exact = 0;
  for (let i = 0; i < cuts; i++) {
    const c = CUT_CASES[random(CUT_CASES.length)];
    const afterBytes = cutOffset(c, pages, random);
    await t.test(`${i}: ${c.channel} ${c.direction} ${c.action} after ${afterBytes}`, async (t) => {
      const r = await restoreThroughCut(t, bytes, c, afterBytes, recovery, sourceHeartbeat);
      t.ok(r.exact && r.report.digestMatch, 'byte-exact');
      if (r.exact && r.report.digestMatch) exact++;
      fired += r.proxy.fired.length;
      resumes += (r.report.recovery as { resumes: number }).resumes;
      if (r.detectMs >= 0) (detect[c.action] ??= []).push(r.detectMs);
      if (r.resumeMs >= 0) (resume[c.action] ??= []).push(r.resumeMs);
    });
  }
  const figures = (m: Record<string, number[]>) =>
    Object.fromEntries(Object.entries(m).map(([k, xs]) => [k, { n: xs.length, p50: quantile(xs, 0.5), p90: quantile(xs, 0.9), max: Math.max(...xs) }]));
  const summary = {
    seed,
    cuts,
    exact,
    fired,
    resumes,
    detection: defaults ? 'default' : 'fast',
    detectMs: figures(detect),
    resumeMs: figures(resume),
    fdsBefore: fds,
    fdsAfter: readdirSync('/proc/self/fd').length,
  };
  t.equal(exact, cuts, 'every restore ended byte-exact');
  process.stdout.write(JSON.stringify(summary) + '\n');
});
