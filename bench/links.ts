// The links the benchmark runs over: a unix socket, TCP loopback, and veth
// links between two network namespaces the benchmark creates and removes
// itself, at a data-centre rate (tc netem adds a one-way delay where the
// kernel has it; otherwise tbf sets the rate alone). Each link is named after
// what it is on this machine: veth-10g-50us with the delay, veth-10g without.
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { startSource, type RunningSource } from './source.js';

export interface LinkSpec {
  name: string;
  /** The floor case figures on this link are compared with. */
  floorCase: 'unix' | 'tcp';
  /** Namespace links: rate in Gbit/s and one-way delay in µs. */
  emulate?: { gbit: number; delayUs: number };
}

export const LINKS: LinkSpec[] = [
  { name: 'unix', floorCase: 'unix' },
  { name: 'tcp', floorCase: 'tcp' },
  { name: 'veth-10g', floorCase: 'tcp', emulate: { gbit: 10, delayUs: 50 } },
  { name: 'veth-1g', floorCase: 'tcp', emulate: { gbit: 1, delayUs: 250 } },
];

export interface LinkUp {
  spec: LinkSpec;
  /** The link as it is here: the spec's name, plus the delay when one was added (veth-10g-50us). */
  name: string;
  /** What the link really is on this machine (e.g. "rate only: no netem"). */
  description: string;
  source: RunningSource;
  token?: string;
  down(): Promise<void>;
}

export type LinkResult = { up: LinkUp } | { skipped: string };

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });

function tryTc(args: string[]): boolean {
  try {
    sh('tc', args);
    return true;
  } catch {
    return false;
  }
}

/** Brings the link up and starts a source serving `imagePath` across it. */
export async function bringUp(spec: LinkSpec, imagePath: string, dir: string): Promise<LinkResult> {
  if (spec.name === 'unix') {
    const source = await startSource(imagePath, `unix:${join(dir, 'source.sock')}`);
    return { up: { spec, name: spec.name, description: 'unix socket', source, down: () => source.close() } };
  }
  if (!spec.emulate) {
    const source = await startSource(imagePath, 'tcp:127.0.0.1:0');
    return { up: { spec, name: spec.name, description: 'TCP loopback', source, ...(source.token ? { token: source.token } : {}), down: () => source.close() } };
  }
  return bringUpNamespaceLink(spec, imagePath, dir);
}

/** A veth pair into a network namespace made here, shaped to a spec's rate (and delay, where netem is). */
export interface NamespaceLink {
  ns: string;
  /** This side's address, and the namespace's. */
  hostAddress: string;
  peerAddress: string;
  name: string;
  description: string;
  /** Removes the namespace and the pair (once; also at exit). */
  remove(): void;
}

/** Makes the namespace and the shaped pair, or says why it cannot here. */
export function namespaceLink(spec: LinkSpec): NamespaceLink | { skipped: string } {
  if (process.getuid?.() !== 0) return { skipped: 'network namespaces need root' };
  const id = `${process.pid % 100000}${spec.emulate!.gbit}`;
  const ns = `pcb${id}`;
  const host = `pcbh${id}`;
  const peer = `pcbn${id}`;
  const subnet = `10.${200 + (spec.emulate!.gbit % 50)}.${process.pid % 250}`;
  let removed = false;
  const remove = () => {
    if (removed) return;
    removed = true;
    process.off('exit', remove);
    try {
      sh('ip', ['netns', 'del', ns]);
    } catch {
      /* already gone */
    }
    try {
      sh('ip', ['link', 'del', host]);
    } catch {
      /* went with the namespace */
    }
  };
  process.once('exit', remove);
  try {
    sh('ip', ['netns', 'add', ns]);
    sh('ip', ['link', 'add', host, 'type', 'veth', 'peer', 'name', peer]);
    sh('ip', ['link', 'set', peer, 'netns', ns]);
    sh('ip', ['addr', 'add', `${subnet}.1/24`, 'dev', host]);
    sh('ip', ['link', 'set', host, 'up']);
    sh('ip', ['netns', 'exec', ns, 'ip', 'addr', 'add', `${subnet}.2/24`, 'dev', peer]);
    sh('ip', ['netns', 'exec', ns, 'ip', 'link', 'set', peer, 'up']);
    sh('ip', ['netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up']);
  } catch (err) {
    remove();
    return { skipped: `cannot create network namespaces here: ${String((err as { stderr?: Buffer }).stderr ?? err).trim()}` };
  }
  const { gbit, delayUs } = spec.emulate!;
  const rate = `${gbit}gbit`;
  let description: string;
  let name = spec.name;
  const netem = ['qdisc', 'add', 'dev', host, 'root', 'netem', 'delay', `${delayUs}us`, 'rate', rate];
  if (tryTc(netem)) {
    sh('ip', ['netns', 'exec', ns, 'tc', 'qdisc', 'add', 'dev', peer, 'root', 'netem', 'delay', `${delayUs}us`, 'rate', rate]);
    description = `veth between namespaces, netem ${rate} with ${delayUs} µs one way`;
    name = `${spec.name}-${delayUs}us`;
  } else {
    const burst = gbit >= 10 ? '1mb' : '256kb';
    const tbf = ['root', 'tbf', 'rate', rate, 'burst', burst, 'latency', '20ms'];
    if (!tryTc(['qdisc', 'add', 'dev', host, ...tbf])) {
      remove();
      return { skipped: 'neither tc netem nor tbf is available in this kernel' };
    }
    sh('ip', ['netns', 'exec', ns, 'tc', 'qdisc', 'add', 'dev', peer, ...tbf]);
    description = `veth between namespaces, tbf ${rate}; no added delay (this kernel has no netem)`;
  }
  return { ns, hostAddress: `${subnet}.1`, peerAddress: `${subnet}.2`, name, description, remove };
}

async function bringUpNamespaceLink(spec: LinkSpec, imagePath: string, dir: string): Promise<LinkResult> {
  const link = namespaceLink(spec);
  if ('skipped' in link) return link;
  const { ns, name, description, remove, peerAddress } = link;
  // Beyond loopback, so the source insists on a token.
  const tokenFile = join(dir, `token-${ns}`);
  const token = randomBytes(16).toString('hex');
  writeFileSync(tokenFile, token, { mode: 0o600 });
  try {
    const source = await startSource(imagePath, `tcp:${peerAddress}:0`, { wrap: ['ip', 'netns', 'exec', ns], tokenFile });
    return {
      up: {
        spec,
        name,
        description,
        source,
        token,
        async down() {
          await source.close();
          remove();
        },
      },
    };
  } catch (err) {
    remove();
    throw err;
  }
}
