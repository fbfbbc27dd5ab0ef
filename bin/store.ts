// postcopy store: images in a snapshot store on S3-compatible object storage
// (docs/STORE.md): push, ls, rm, gc.
import type { Logger } from '../lib/logger.js';
import { Image } from '../lib/image.js';
import { checkImageName, parseImageUrl, parseStoreUrl } from '../lib/store/address.js';
import { SnapshotStore } from '../lib/store/snapshot-store.js';
import { parseCommandLineWithArgs, parseDuration, parseSize, requireOptions, tenantKeyOption, UsageError } from './options.js';
import type { TenantKey } from '../lib/store/tenant.js';
import { formatBytes } from './terminal.js';

export async function store(argv: string[], log: Logger): Promise<void> {
  const [which, ...rest] = argv;
  if (which === 'push') return push(rest, log);
  if (which === 'ls') return list(rest, log);
  if (which === 'rm') return remove(rest, log);
  if (which === 'gc') return collect(rest, log);
  throw new UsageError(
    which === undefined ? 'postcopy store takes a command: push, ls, rm or gc' : `postcopy store takes push, ls, rm or gc, not ${JSON.stringify(which)}`,
  );
}

/** --tenant-key-file, when given: chunks and manifests sealed with the tenant's key. */
function tenantOf(values: { 'tenant-key-file'?: string }): { tenant?: TenantKey } {
  return values['tenant-key-file'] === undefined ? {} : { tenant: tenantKeyOption(values['tenant-key-file']) };
}

function storeArg(positionals: string[], what: string): string {
  if (positionals.length !== 1) throw new UsageError(`postcopy store ${what}: give one store address`);
  return positionals[0];
}

/** A store address from the command line: a usage mistake when it does not parse. */
function usable<T>(parse: () => T): T {
  try {
    return parse();
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
}

async function push(argv: string[], log: Logger): Promise<void> {
  const { values, args: files } = parseCommandLineWithArgs(argv, {
    to: { type: 'string' },
    name: { type: 'string' },
    parent: { type: 'string' },
    'chunk-size': { type: 'string' },
    replace: { type: 'boolean' },
    'create-bucket': { type: 'boolean' },
    'tenant-key-file': { type: 'string' },
    json: { type: 'boolean' },
  });
  requireOptions(values, ['to', 'name'], 'postcopy store push FILE... --to s3://BUCKET[/PREFIX] --name NAME');
  if (files.length === 0) throw new UsageError('postcopy store push: give the image file(s) to push');
  const address = usable(() => parseStoreUrl(values.to as string));
  usable(() => checkImageName(values.name as string));
  if (values.parent !== undefined) usable(() => checkImageName(values.parent as string));
  const chunkBytes = values['chunk-size'] === undefined ? undefined : parseSize(values['chunk-size'], '--chunk-size', 4096);
  const image = Image.open(files.map((path) => ({ path })));
  const snapshots = new SnapshotStore(address, { logger: log, ...tenantOf(values) });
  try {
    if (values['create-bucket']) await snapshots.objects.createBucket();
    const report = await snapshots.push(image, values.name as string, {
      ...(values.parent !== undefined ? { parent: values.parent } : {}),
      ...(chunkBytes !== undefined ? { chunkBytes } : {}),
      ...(values.replace ? { replace: true } : {}),
      onProgress: (p) => log.info(p, 'pushing'),
    });
    process.stdout.write(
      values.json
        ? JSON.stringify(report) + '\n'
        : `pushed ${snapshots.url}/${report.name}: ${formatBytes(report.bytes)} in ${report.chunks} chunks (${report.zeroChunks} zero, ${report.presentChunks} already stored, ${report.repeatedChunks} repeated); uploaded ${report.uploadedChunks} chunks, ${formatBytes(report.uploadedBytes)} (${(report.uploadedRatio * 100).toFixed(1)}% of the image) in ${report.tookMs} ms\n`,
    );
  } finally {
    snapshots.close();
    image.close();
  }
}

async function list(argv: string[], log: Logger): Promise<void> {
  const { values, args } = parseCommandLineWithArgs(argv, { json: { type: 'boolean' }, 'tenant-key-file': { type: 'string' } });
  const address = usable(() => parseStoreUrl(storeArg(args, 'ls')));
  const snapshots = new SnapshotStore(address, { logger: log, ...tenantOf(values) });
  try {
    const images = await snapshots.list();
    if (values.json) process.stdout.write(JSON.stringify(images) + '\n');
    else for (const i of images) process.stdout.write(`${i.name}\t${formatBytes(i.bytes)}\t${i.created}${i.parent ? `\tparent ${i.parent}` : ''}\n`);
  } finally {
    snapshots.close();
  }
}

async function remove(argv: string[], log: Logger): Promise<void> {
  const { values, args } = parseCommandLineWithArgs(argv, { force: { type: 'boolean' }, 'tenant-key-file': { type: 'string' } });
  const image = usable(() => parseImageUrl(storeArg(args, 'rm')));
  const snapshots = new SnapshotStore(image, { logger: log, ...tenantOf(values) });
  try {
    await snapshots.remove(image.name, { force: values.force === true });
    process.stdout.write(`removed ${snapshots.url}/${image.name} (its chunks go at the next gc)\n`);
  } finally {
    snapshots.close();
  }
}

async function collect(argv: string[], log: Logger): Promise<void> {
  const { values, args } = parseCommandLineWithArgs(argv, { grace: { type: 'string' }, json: { type: 'boolean' }, 'tenant-key-file': { type: 'string' } });
  const address = usable(() => parseStoreUrl(storeArg(args, 'gc')));
  const graceMs = values.grace === undefined ? undefined : parseDuration(values.grace, '--grace');
  const snapshots = new SnapshotStore(address, { logger: log, ...tenantOf(values) });
  try {
    const report = await snapshots.gc(graceMs === undefined ? {} : { graceMs });
    process.stdout.write(
      values.json
        ? JSON.stringify(report) + '\n'
        : `${report.images} images name ${report.kept} of ${report.chunks} chunks; deleted ${report.deleted} chunks and ${report.packsDeleted} of ${report.packs} packs (${formatBytes(report.bytesFreed)}); ${formatBytes(report.packBytesUnneeded)} of the packs kept hold no image's chunk\n`,
    );
  } finally {
    snapshots.close();
  }
}
