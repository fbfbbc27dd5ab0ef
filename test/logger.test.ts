// Logs reach stderr whole and in order, however slowly the reader drains it.
import t from 'tap';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ensureBuilt, here } from './helpers.js';

t.test('a logger on a pipe nobody drains for a while neither throws nor loses records', async (t) => {
  ensureBuilt();
  const logger = pathToFileURL(join(here, '..', 'dist', 'lib', 'logger.js')).href;
  const records = 20000;
  const script = `
    const { createLogger } = await import(${JSON.stringify(logger)});
    process.stderr; // as the CLI does: Node makes a piped stderr non-blocking
    for (const format of ['json', 'pretty']) {
      const log = createLogger({ format, level: 'info', beforeWrite() {} });
      for (let i = 0; i < ${records / 2}; i++) log.info({ i, pad: 'x'.repeat(100) }, 'record');
    }`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'ignore', 'pipe'] });
  child.stderr.pause();
  await new Promise((r) => setTimeout(r, 300)); // the pipe (64 KiB) fills and the writer meets EAGAIN
  let text = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => (text += d));
  child.stderr.resume();
  const code = await new Promise((resolve) => child.on('close', resolve));
  t.equal(code, 0, 'the writer did not throw');
  const lines = text.split('\n').filter(Boolean);
  t.equal(lines.length, records, 'every record arrived');
  t.equal(lines.filter((l) => l.includes('"msg":"record"')).length, records / 2, 'the JSON half whole');
});
