// The failure matrix soaked (npm run soak:matrix): every cell of
// test/failure-matrix.ts at MATRIX_ROUNDS random points each (default 20).
// Not part of `npm test`.
//   MATRIX_SEED=N                            replay a run
//   MATRIX_MODES=a,b  MATRIX_FAILURES=x,y    a part of the matrix
import t from 'tap';
import { runMatrix } from './failure-matrix.js';

const rounds = Number(process.env.MATRIX_ROUNDS ?? 20);
const seed = Number(process.env.MATRIX_SEED ?? Date.now() % 1e9);
t.comment(`MATRIX_SEED=${seed} MATRIX_ROUNDS=${rounds}`);

for (const destination of ['restore', 'vmm'] as const)
  t.test(`${destination}: every cell at ${rounds} points`, async (t) => {
    const table = await runMatrix(t, destination, seed, rounds);
    for (const row of table) t.comment(row);
  });
