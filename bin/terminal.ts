// What the CLI shows a person at a terminal: one live progress line on
// stderr, redrawn in place and cleared before anything else is written (a log
// record, a result), so nothing glues onto it. It is there whenever stderr is
// a terminal, whatever stdout is (--json, a pipe); nothing otherwise.
import type { DestinationStats } from '../lib/native.js';

let shown = false;

/** Wipes the progress line, if one is shown (the logger calls this before each record). */
export function clearProgress(): void {
  if (!shown) return;
  process.stderr.write('\r\x1b[2K');
  shown = false;
}

function draw(line: string): void {
  process.stderr.write(`\r\x1b[2K${line}`);
  shown = true;
}

/** Live figures of a restore, five times a second; returns the function that stops them (leaving the last line). */
export function startProgress(stats: () => DestinationStats, state: () => string = () => 'running'): () => void {
  if (!process.stderr.isTTY) return () => {};
  const update = () => {
    const s = stats();
    const now = state();
    if (now === 'paused' || now === 'resuming') {
      draw(`${now.toUpperCase()}: the source is out of reach; ${s.outstandingRequests} requested page(s) wait (reconnecting)`);
      return;
    }
    const pct = s.totalPages ? ((100 * s.residentPages) / s.totalPages).toFixed(1) : '0';
    const us = (ns: number) => (ns / 1000).toFixed(1);
    draw(
      `resident ${pct}% (${s.residentPages}/${s.totalPages} pages)  faults ${s.faults}  p50 ${us(s.faultLatency.p50Ns)} µs  p99 ${us(s.faultLatency.p99Ns)} µs  ` +
        `blocked ${(s.blockedNs / 1e6).toFixed(0)} ms  ${(s.bytesReceived / 2 ** 20).toFixed(1)} MiB in`,
    );
  };
  const timer = setInterval(update, 200);
  return () => {
    clearInterval(timer);
    update();
    process.stderr.write('\n');
    shown = false;
  };
}

/** Bytes as a person reads them: 512 B, 12.0 KiB, 3.4 MiB, 1.20 GiB. */
export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 2 ** 20) return `${(bytes / 1024).toFixed(1)} KiB`;
  if (bytes < 2 ** 30) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
}
