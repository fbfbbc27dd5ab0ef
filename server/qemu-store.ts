// QEMU snapshots (docs/QEMU-SNAPSHOT.md) in a snapshot store (docs/STORE.md):
// the RAM blocks are the image's regions, in the snapshot's order; the
// stream's parts kept verbatim and the snapshot's own manifest.json are the
// image's files. A restore fetches the files only; the RAM comes as QEMU reads
// it (bin/qemu.ts, docs/STORE.md).
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../lib/image.js';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import { formatStoreUrl, type ImageAddress } from '../lib/store/address.js';
import type { ChunkCache } from '../lib/store/chunk-cache.js';
import { SnapshotStore, type PushReport } from '../lib/store/snapshot-store.js';
import type { TenantKey } from '../lib/store/tenant.js';
import type { Manifest } from '../lib/store/manifest.js';
import { readManifest } from './qemu-source.js';

/** Pushes the snapshot in `dir` as image `at.name` (sealed with `tenant`'s key when given). */
export async function pushQemuSnapshot(dir: string, at: ImageAddress, log: Logger, tenant?: TenantKey): Promise<PushReport> {
  const manifest = readManifest(dir);
  const kept = [manifest.files.configuration, manifest.files.ramSetup, manifest.files.devices, manifest.files.vmDescription].filter((f): f is string => !!f);
  const image = Image.open(manifest.blocks.map((b) => ({ path: join(dir, b.file), name: b.name })));
  const store = new SnapshotStore(at, { logger: log, ...(tenant ? { tenant } : {}) });
  try {
    return await store.push(image, at.name, { files: ['manifest.json', ...kept].map((name) => ({ name, bytes: readFileSync(join(dir, name)) })) });
  } finally {
    store.close();
    image.close();
  }
}

/**
 * Writes into `dir` (made) the files of image `name` (a QEMU snapshot): its
 * manifest.json and the stream's parts, every one checked; not its RAM, which
 * a restore from the store fetches as it is read (bin/qemu.ts). Refuses an
 * image that is not a QEMU snapshot, or whose blocks do not match its regions.
 * The image's manifest, for the store session that restores the RAM (read once).
 */
export async function fetchQemuSnapshotFiles(store: SnapshotStore, name: string, dir: string, cache: ChunkCache, log: Logger): Promise<Manifest> {
  const manifest = await store.manifest(name);
  const files = await store.files(manifest, cache);
  const where = formatStoreUrl(store.address, name);
  if (!files.some((f) => f.name === 'manifest.json'))
    throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${where} is not a QEMU snapshot (no manifest.json with it)`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  for (const f of files) writeFileSync(join(dir, f.name), f.bytes, { mode: 0o600 });
  const qemu = readManifest(dir);
  if (qemu.blocks.length !== manifest.regions.length || qemu.blocks.some((b, i) => b.length !== manifest.regions[i].length))
    throw new PostcopyError(ErrorCode.STORE_CORRUPT, `${where}: its blocks do not match its regions`);
  log.info({ image: where, dir, blocks: qemu.blocks.length }, "the QEMU snapshot's device state is here; its RAM comes from the store as QEMU reads it");
  return manifest;
}
