// The failure matrix in CI, for a VMM through the handler (the handle CLI and the C VMM fixture): every
// delivery mode against every failure, each cell once at a random point
// (test/failure-matrix.ts says what a cell must do; MATRIX_SEED replays a run,
// MATRIX_MODES and MATRIX_FAILURES run a part; npm run soak:matrix runs many
// points).
import t from 'tap';
import { runMatrix } from './failure-matrix.js';

const seed = Number(process.env.MATRIX_SEED ?? Date.now() % 1e9);
t.comment(`MATRIX_SEED=${seed}`);

t.test('every mode x every failure: byte-exact, or the coded failure asked for; never a hang, never a lost page', async (t) => {
  const table = await runMatrix(t, 'vmm', seed);
  for (const row of table) t.comment(row);
});
