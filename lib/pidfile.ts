// A pid file (--pidfile), as CRIU and init scripts read one: this process's
// pid and a newline, written whole or not at all, and removed as it exits.
import { readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';

/**
 * Writes this process's pid to `path` through a temporary file beside it and
 * a rename, so a reader never sees it half written; removed when this process
 * exits (however it exits, short of SIGKILL). Returns the removal, to call
 * earlier.
 */
export function writePidFile(path: string): () => void {
  const temporary = `${path}.${process.pid}.tmp`;
  try {
    writeFileSync(temporary, `${process.pid}\n`, { mode: 0o644 });
    renameSync(temporary, path);
  } catch (err) {
    rmSync(temporary, { force: true });
    throw err;
  }
  const remove = () => {
    process.off('exit', remove);
    removePidFile(path);
  };
  process.once('exit', remove);
  return remove;
}

/** Removes `path` if it still names this process (another may have taken it over since). */
function removePidFile(path: string): void {
  try {
    if (readFileSync(path, 'utf8').trim() === String(process.pid)) rmSync(path, { force: true });
  } catch {
    /* already gone */
  }
}
