import t from 'tap';
import { join } from 'node:path';
import { Image } from '../server/image.js';
import { PageServer } from '../server/page-server.js';
import { Destination } from '../client/destination.js';
import { shuffledOrder, touchPages } from '../lib/workload.js';
import { PAGE, randomImage, tempDir } from './helpers.js';

t.test('smoke: restore a buffer image over a unix socket', async (t) => {
  const dir = tempDir(t);
  const pages = 2048;
  const bytes = randomImage(pages, 7);
  const image = Image.open([{ buffer: bytes }]);
  const server = new PageServer({ image });
  t.teardown(() => server.close());
  await server.listen(`unix:${join(dir, 'src.sock')}`);
  const dest = await Destination.connect({ source: `unix:${join(dir, 'src.sock')}` });
  t.teardown(() => dest.close());
  const region = dest.regions[0].mapping;
  const touched = await touchPages(region.address, pages, shuffledOrder(pages, 3));
  const report = await dest.finish();
  t.equal(report.digestMatch, true);
  t.ok(region.buffer().equals(bytes));
  t.ok(report.faults > 0);
  t.equal(report.pagesOnDemand + report.pagesPrefaulted + report.pagesBackground, pages);
  t.equal(touched.firstBytes.length, pages);
  console.log(report);
});
