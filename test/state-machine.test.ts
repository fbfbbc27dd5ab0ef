// The guarded state machine (lib/state-machine.ts): each change is checked
// against its table and logged, and the log always says which state it went to.
import t from 'tap';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { StateMachine } from '../lib/state-machine.js';

function recorder() {
  const records: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk, _encoding, done) {
      for (const line of String(chunk).split('\n').filter(Boolean)) records.push(JSON.parse(line));
      done();
    },
  });
  return { records, log: pino({ level: 'info' }, sink) };
}

t.test('a change is logged with the state it went to, even when its details carry a state of their own', async (t) => {
  const { records, log } = recorder();
  const machine = new StateMachine<'a' | 'b' | 'c'>('thing', 'a', { a: ['b'], b: ['c'], c: [] }, log);
  machine.to('b');
  // A session's status (its own `state`: the one it leaves) passed as the details of its last change.
  machine.to('c', { state: 'b', resumes: 0 });
  await new Promise((r) => setImmediate(r));
  const last = records.at(-1)!;
  t.match(last, { msg: 'thing state', from: 'b', state: 'c', resumes: 0 }, 'b -> c, not b -> b');
  t.throws(() => machine.to('a'), { code: 'ERR_INVALID_TRANSITION' }, 'a change the table does not allow is refused');
});

t.test('which changes are warnings is the owner’s to say; every other is info', async (t) => {
  const { records, log } = recorder();
  const machine = new StateMachine<'running' | 'paused' | 'resuming'>(
    's',
    'running',
    { running: ['paused'], paused: ['resuming'], resuming: ['paused', 'running'] },
    log,
    (to, from) => to === 'paused' && from !== 'resuming',
  );
  machine.to('paused');
  machine.to('resuming');
  machine.to('paused');
  await new Promise((r) => setImmediate(r));
  t.same(
    records.slice(1).map((r) => [r.from, r.state, r.level]),
    [
      ['running', 'paused', 40],
      ['paused', 'resuming', 30],
      ['resuming', 'paused', 30],
    ],
    'the pause is a warning once; a retry that fails is not a new one',
  );
});
