// postcopy store: images in a snapshot store on S3-compatible object storage
// (docs/STORE.md): push, ls, rm, gc.
import type { Logger } from '../lib/logger.js';
import { Image } from '../lib/image.js';
import { checkImageName, parseImageUrl, parseStoreUrl } from '../lib/store/address.js';
import { SnapshotStore } from '../lib/store/snapshot-store.js';
import { parseCommandLineWithArgs, parseDuration, parseSize, requireOptions, tenantKeyOption, UsageError } from './options.js';
import type { TenantKey } from '../lib/store/tenant.js';
import { formatBytes } from './terminal.js';

export const storeUsage = `postcopy store push FILE... --to s3://BUCKET[/PREFIX] --name NAME [--parent NAME] [--chunk-size SIZE] [--replace] [--create-bucket]
                   [--tenant-key-file F] [--json]
postcopy store ls s3://BUCKET[/PREFIX] [--tenant-key-file F] [--json]
postcopy store rm s3://BUCKET[/PREFIX]/NAME [--force] [--tenant-key-file F]
postcopy store gc s3://BUCKET[/PREFIX] [--grace DURATION] [--tenant-key-file F] [--json]

  A snapshot store keeps images on S3-compatible object storage (Ceph RGW,
  MinIO, AWS S3, R2) as a manifest per image and chunks named by the SHA-256
  of their content: a chunk any image holds already is never stored or
  uploaded again, and zero chunks are never stored. restore --image
  s3://BUCKET/PREFIX/NAME restores one lazily, with no source process.
  The endpoint and keys are read the AWS way: AWS_ENDPOINT_URL_S3 or
  AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or
  AWS_PROFILE and ~/.aws/credentials), AWS_REGION; addressing is path-style.

  push uploads FILE (each FILE is one region, in order) as NAME: the chunks
  the store lacks, then the manifest. --parent NAME: the image it derives
  from (its chunks are known present; rm refuses NAME's parent while NAME
  exists). --chunk-size: a power of two from 4K to 16M (default 64K).
  --replace: overwrite an image of that name (default: refused,
  ERR_STORE_CONFLICT). --create-bucket: create the bucket when it is missing.
  Prints what it uploaded against the image's size.
  --tenant-key-file F: seal every chunk and manifest with the tenant's
  secret in F (16 bytes or more): the store never sees plaintext, chunk
  names say nothing of their content, and the tenant's identical chunks
  still deduplicate (a chunk's key derives from its content and the
  secret). Every command reading the image needs the same file. Give each
  tenant its own PREFIX: gc refuses a store holding a manifest its key does
  not open.
  ls lists the images; rm removes one (its chunks go at the next gc);
  gc deletes the chunks no image names that are older than --grace (default
  1h), safely beside pushes under way.`;

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
        : `${report.images} images name ${report.kept} of ${report.chunks} chunks; deleted ${report.deleted} (${formatBytes(report.bytesFreed)})\n`,
    );
  } finally {
    snapshots.close();
  }
}
