// QEMU snapshots (docs/QEMU-SNAPSHOT.md) in a snapshot store (docs/STORE.md):
// the RAM blocks are the image's regions, in the snapshot's order; the
// stream's parts kept verbatim and the snapshot's own manifest.json are the
// image's files. Fetched back, they make the same snapshot directory.
import { closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { Image } from '../lib/image.js';
import { ErrorCode, PostcopyError } from '../lib/errors.js';
import type { Logger } from '../lib/logger.js';
import { formatStoreUrl, type ImageAddress } from '../lib/store/address.js';
import { ChunkCache, type ChunkCacheOptions } from '../lib/store/chunk-cache.js';
import { SnapshotStore, type PushReport } from '../lib/store/snapshot-store.js';
import type { TenantKey } from '../lib/store/tenant.js';
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

/** Fetches image `at.name` (a QEMU snapshot) into `dir` (made), every chunk checked; block images sparse. */
export async function fetchQemuSnapshot(at: ImageAddress, dir: string, cache: ChunkCacheOptions, log: Logger, tenant?: TenantKey): Promise<void> {
  const store = new SnapshotStore(at, { logger: log, ...(tenant ? { tenant } : {}) });
  try {
    const { manifest, regions, files } = await store.download(at.name, { cache: new ChunkCache({ ...cache, logger: log }) });
    if (!files.some((f) => f.name === 'manifest.json'))
      throw new PostcopyError(ErrorCode.IMAGE_INVALID, `${formatStoreUrl(at, at.name)} is not a QEMU snapshot (no manifest.json with it)`);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    for (const f of files) {
      const fd = openSync(join(dir, f.name), 'w', 0o600);
      try {
        writeSync(fd, f.bytes);
      } finally {
        closeSync(fd);
      }
    }
    const qemu = readManifest(dir);
    if (qemu.blocks.length !== regions.length)
      throw new PostcopyError(ErrorCode.STORE_CORRUPT, `${formatStoreUrl(at, at.name)}: its blocks do not match its regions`);
    qemu.blocks.forEach((b, i) => {
      const region = manifest.regions[i];
      const fd = openSync(join(dir, b.file), 'w', 0o600);
      try {
        ftruncateSync(fd, b.length);
        // Zero chunks stay holes, as in a snapshot made here.
        region.chunks.forEach((hash, k) => {
          if (!hash) return;
          const at_ = k * region.chunkBytes;
          const end = Math.min(b.length, at_ + region.chunkBytes);
          if (at_ < end) writeSync(fd, regions[i], at_, end - at_, at_);
        });
      } finally {
        closeSync(fd);
      }
    });
    log.info({ image: formatStoreUrl(at, at.name), dir, blocks: qemu.blocks.length, fetched: store.objects.stats }, 'fetched the QEMU snapshot from the store');
  } finally {
    store.close();
  }
}
