// Every command's usage, as `postcopy --help` prints it (the README quotes it
// word for word). Text alone, with no imports: the CLI prints help and its
// version without loading any command, the addon or a library.

export const recoveryUsage = `  --give-up-after DURATION   when the source is out of reach this long, fail
                             (default: keep reconnecting, warning at each attempt)
  --silence-timeout DURATION a control channel or page stream quiet this long
                             is taken as broken (default 5s)`;

export const loggingUsage = `  --log-level LEVEL          fatal, error, warn, info, debug, trace or silent
                             (default: warn on a terminal, info otherwise)
  --log-format json|pretty   logs on stderr (default: pretty on a terminal, JSON otherwise)`;

export const storeOptionUsage = `  --cache-dir DIR        an image in a store: the host's chunk cache, shared by
                         every restore on this host (default
                         $POSTCOPY_CHUNK_CACHE, else /var/cache/uffd-postcopy/chunks
                         as root, else ~/.cache/uffd-postcopy/chunks)
  --cache-size SIZE      the most the chunk cache holds, e.g. 20G (default 4G;
                         the chunks used least recently go first)
  --tenant-key-file F    the tenant's secret the image was pushed with
                         (postcopy store push --tenant-key-file)`;

export const serviceUsage = `  --pidfile PATH             once it serves, its pid is written to PATH (whole: a
                             file beside it, renamed), removed as it exits
  $NOTIFY_SOCKET             set by a service manager (systemd, Type=notify):
                             READY=1 once it serves, STOPPING=1 as it stops
                             (unit files: docs/SERVICE.md)`;

export const serveUsage = `postcopy serve --image FILE [--image FILE ...] --listen unix:PATH|tcp:HOST:PORT [--token-file F]
               [--resume-grace DURATION] [--metrics tcp:HOST:PORT] [--release-as-sent] [--pidfile PATH]
postcopy serve --image s3://BUCKET/PREFIX/NAME --listen ... [--cache-dir DIR] [--cache-size SIZE]
postcopy serve --live --socket PATH --listen unix:PATH|tcp:HOST:PORT [--migration MODE]
               [--downtime-limit DURATION] [--max-precopy-rounds N] [--postcopy-after DURATION]
               [--resume-workload MIGRATION] [--pidfile PATH]

  Serves the image (each --image is one region, in order) to any number of
  destinations until SIGINT or SIGTERM. Files are mapped read-only; holes go
  out as zero runs without being read. Listening on TCP (loopback too: other
  users of this host must not read the image) needs a token: --token-file,
  else the default token file ($POSTCOPY_TOKEN_FILE, else
  ~/.config/uffd-postcopy/token), created mode 0600 on first use; a restore
  on this host finds it there, and other hosts need a copy (--token-file).
  A unix socket is created 0600 and needs none. A destination whose connection breaks may resume its session within
  --resume-grace (default 60s); after a restart of this process it resumes
  all the same, from the pages it holds. --metrics serves Prometheus metrics
  at http://HOST:PORT/metrics (port 0: a free one; the URL is printed as
  {"metrics": URL}).

  --image s3://BUCKET/PREFIX/NAME serves an image of a snapshot store (postcopy
  store push) to destinations that speak this protocol (hosts without the
  store's credentials): it is fetched whole into memory first (through the
  host's chunk cache, every chunk checked), then served as any image.

  --release-as-sent frees the image's memory page by page as the destination
  installs it (never merely sends it), so moving it on one host never holds
  two copies. The image must be shared memory this process may write (a file
  on tmpfs such as /dev/shm); one destination; the image is consumed, and this
  exits (0) once the destination holds every page. Another destination is
  refused (ERR_IMAGE_CONSUMED). What was freed is kept beside the image
  (FILE.postcopy-released): killed and started again the same way, this
  serves the same destination again, which resumes from the pages it holds;
  a plain serve of a partly freed image is refused.

  --live moves a running workload (a VMM) to one destination while it runs.
  The workload connects to --socket and hands over its memory as it would to
  a handler (docs/VMM-HANDSHAKE.md, "Live sources": its regions, its
  userfaultfd with WP_ASYNC, its memfd). Precopy rounds go out while it runs
  (everything, then the pages written since, found with PAGEMAP_SCAN); when
  the pages left would take at most --downtime-limit (default 300ms) at the
  rate measured, or after --max-precopy-rounds (default 30) or
  --postcopy-after, or on SIGUSR2, the workload pauses, the destination drops
  the pages written since they were sent and runs at once, and postcopy
  brings the rest: --migration precopy+postcopy, the default. --migration
  postcopy pauses at once (no rounds); precopy sends what is left during the
  pause instead (no postcopy). Prints a JSON
  line with the rounds and the pause, and exits once the destination holds
  every page; if the destination leaves before the switchover, the workload
  goes on here and this exits with the error.

  After the switchover the workload runs at the destination: it stays paused
  here whatever happens to this process. Killed or restarted, serve --live
  finds it again on --socket (the workload connects there again, paused,
  naming its migration), re-adopts its memory and serves the destination
  when it resumes (printing {"readopted": MIGRATION}); any other destination
  is refused. Only a destination that gave up (--give-up-after) ends that: it
  says so and names the migration, and serve --live --resume-workload
  MIGRATION then lets the workload run here again (and may move it anew); a
  workload paused for another migration is refused (ERR_MIGRATION_MISMATCH)
  and stays paused.
${serviceUsage}
${loggingUsage}`;

export const restoreUsage = `postcopy restore (--source unix:PATH|tcp:HOST:PORT | --image FILE | --image s3://BUCKET/PREFIX/NAME) [options]

  --source ADDRESS       again for each replica serving the same image: when
                         one is out of reach, the next is tried in turn
  --image FILE           restore from this image file, in this process (no
                         source, no sockets); again for each region
  --image s3://BUCKET/PREFIX/NAME
                         restore from an image in a snapshot store (postcopy
                         store push): its chunks are fetched as faults need
                         them, then the rest, through the host's chunk cache
${storeOptionUsage}
  --token-file F         the token the source requires
  --out FILE             write the restored memory to FILE, once verified
                         (written beside it, then renamed over it: a failed
                         restore leaves FILE as it was); never the image
                         itself (refused, ERR_USAGE)
  --window F:B           prefault window: F pages after, B before each request
                         (default 8:2; from a store, none: a fault brings
                         its whole chunk)
  --no-background        pure on-demand: no background stream
  --rate SIZE            background rate limit per second, e.g. 200M (default unlimited)
  --workload KIND        random (default): one thread touches every page in a
                         seeded random order; sequential; cold-start: a stable
                         15% working set in a new order each --seed, plus a
                         few pages of that run only; none: background only
  --seed N               workload seed (default 1)
  --record-working-set F write the pages the workload faulted on, in
                         first-touch order, to F (each fault is served alone
                         and the background waits for the workload, so the
                         set holds exactly the pages it touched)
  --prefetch F           replay a recorded working set: its pages go in, in
                         order, as soon as the restore starts (demand faults
                         still go first)
  --in-place             on this host, take the source's memory itself: a
                         source whose image is shared memory (tmpfs, a memfd)
                         passes its fds and nothing is copied; any other
                         source (TCP, a file on disk) is copied as usual
  --thp                  back the restored memory with transparent huge
                         pages: each aligned 2 MiB the background fills
                         whole goes in as one huge page (fewer TLB misses
                         for the workload; needs the kernel's UFFDIO_MOVE)
  --json                 print the report as one JSON line
${recoveryUsage}
${loggingUsage}`;

export const handleUsage = `postcopy handle --socket PATH (--source unix:PATH|tcp:HOST:PORT | --image FILE | --image s3://BUCKET/PREFIX/NAME)
                [--token-file F] [--window F:B] [--no-background] [--rate SIZE]
                [--record-working-set F | --prefetch F] [--in-place] [--template NAME]
                [--give-up-after DURATION] [--silence-timeout DURATION] [--single-process]
                [--metrics tcp:HOST:PORT] [--cache-dir DIR] [--cache-size SIZE] [--pidfile PATH]

  Listens on PATH (0600). A VMM connects and sends a JSON array of its memory
  regions ([{"base_host_virt_addr", "size", "offset", "page_size"}], as
  Firecracker does) with its userfaultfd attached; the handler serves that
  memory's faults from the source until the VMM hangs up. Any number of VMMs.
  Prints one JSON line per finished VMM session.

  --image FILE serves the faults from an image file on this host, in this
  process (no source, no sockets; each --image is one region, in order).
  --image s3://BUCKET/PREFIX/NAME serves them from an image in a snapshot
  store (postcopy store push): no source process; chunks are fetched as
  faults need them, then the rest, through the host's chunk cache
  (--cache-dir, --cache-size: see postcopy restore --help).

  --in-place: with a source on this host whose image is shared memory (tmpfs,
  a memfd), each VMM session takes the source's memory itself (its fds) and
  its faults are served from it here: no page crosses a socket. Any other
  source is served as usual.

  --template NAME: every VMM is a clone of one template of the image. The
  image is filled once into shared memory here (each page fetched at most
  once for all clones, on demand or by the background); each VMM is offered
  it before its handshake, maps it privately (copy on write) and registers
  it for MINOR faults (docs/VMM-HANDSHAKE.md). N guests hold one copy of
  the image plus what each writes. Runs in one process (--single-process).

  --record-working-set F writes, as each VMM session ends, the pages its
  guest faulted on, in first-touch order (faults are served alone and the
  background waits until the guest stops faulting for a second, so the set
  holds exactly the pages it touched). --prefetch F replays such a set in
  each later session: its pages go in at once, in order, ahead of the
  background, while the guest's own faults still go first.

  --source may be given again for each replica serving the same image: when
  one is out of reach, sessions resume from the next in turn.

  When the source dies or the link breaks, each VMM's session pauses (its
  faults wait) and reconnects by itself, resuming where it stopped. With
  --give-up-after, a session whose source stays out of reach that long
  poisons the pages still missing: the guest gets SIGBUS, never a hang.
  The handler survives its own crash: a supervisor holds every VMM's socket
  and userfaultfd and restarts the worker that serves them
  (--single-process: one process, no supervisor). Should the supervisor die
  instead, its worker serves the VMMs it holds until each hangs up, then
  exits; a new handle on the same socket serves new VMMs. It checks at start-up that
  the source answers (and refuses to start otherwise), then every 30 s, and
  logs each VMM session's progress every 10 s. --metrics serves Prometheus
  metrics at http://HOST:PORT/metrics (port 0: a free one, kept across worker
  restarts; the URL is printed as {"metrics": URL}).
${recoveryUsage}
${serviceUsage}
${loggingUsage}`;

export const benchUsage = `postcopy bench [--full] [--out DIR] [--pages N] [--link NAME ...] [--rounds R] [--json]
  Links (unix, tcp, veth links between network namespaces at data-centre
  rates) x access patterns x transfer policies (x image sizes with --full),
  each beside bench/floor.c (a plain-C page service) measured in the same run.
  Prints the headline: per link, pattern and threads, the default policy's
  workload time over the best fixed policy's and its fault p50 over pure
  on-demand's (medians of R interleaved rounds, default 1). Writes
  results.json, report.md and SVG plots to ./reports/<time>/ in the current
  directory, or --out DIR (see bench/README.md).

postcopy bench latency|throughput [--pages N] [--transport T,T,...] [--seed S] [--rounds R] [--json]
  The floor's own workload only (one thread, every page once, random order;
  or the whole image streamed), ours and bench/floor.c's interleaved R times
  (default 3): the ratio is the median of the per-round ratios, with their
  spread. --transport: unix, tcp (default unix,tcp), and for latency image:
  faults served from the image file in this process, beside the floor's
  local case.

postcopy bench local [--pages N] [--rounds R] [--seed S] [--json]
  restoring on one host, each beside the floor's local case (a plain-C
  handler copying each fault from memory in its own process): fault latency
  from a local image (--image), and a cold start from a local image and from
  a unix-socket source with and without --prefetch of a recorded working set
  (demand faults, time until the workload finishes).

postcopy bench localhost [--pages N] [--clones N,N,...] [--json]
  Memory on one host (anonymous and shared memory, sampled from /proc every
  10 ms): peak of source and destination together over the image's size for
  a move of N pages (default 262144: 1 GiB) by copy, --release-as-sent and
  --in-place; and for 1, 4 and 16 clones (--clones) of an image a quarter
  that size through handle --template: peak memory, the destination side's
  memory, pages the source sent, and each clone's time to read and check
  every page.

postcopy bench live [--pages N] [--write-rates P,P,...] [--rate SIZE] [--json]
  A running workload (the VMM fixture, writing P% of its N pages a second;
  default 1,10,50 and 65536 pages) moved to a restore by pure postcopy,
  precopy then postcopy, and precopy alone, side by side: the pause (workload
  paused to destination running), total time, bytes sent, the destination's
  faults in its first second, rounds, pages discarded. --rate: the link's
  rate in bytes a second, suffixes binary (1 Gb/s is 125000000, about 119M;
  default: a unix socket's).

postcopy bench qemu [--guest-mib N] [--rounds R] [--json]
  The test guest (test/guest: Debian's kernel and busybox, a program checking
  N MiB of its memory every second; default 64) booted under TCG, saved by
  QEMU (exec:cat) and imported from that stream; then, alternating R rounds
  (default 3): postcopy qemu restore of the snapshot against QEMU's own
  restore of the same stream (-incoming "exec:cat FILE"): time to the guest
  running and to completion, and our page-request latency; beside them, the
  same guest migrated QEMU to QEMU in postcopy, without and with
  postcopy-preempt. Needs qemu-system-x86 and the Debian package lists.

postcopy bench store [--pages N] [--chunk-sizes S,S,...] [--cases C,C,...] [--json]
  The snapshot store on the S3 endpoint the AWS variables name (eval
  "$(npm run --silent store:up)" starts a Ceph RGW here), each figure beside
  its baseline on the same store in the same run: dedup (20 children of a
  base pushed with their parent: bytes stored against base + what differs),
  cold (a random tenth of N pages, default 65536, with an empty cache: fault
  p50/p99 against a GET of one chunk, without and with the background
  fetching the rest; bytes fetched against bytes needed),
  and full (time to full residency against one GET of the same bytes), per
  chunk size (default 64K,128K,256K,512K); guest (the QEMU test guest saved
  twice, seconds apart, each save pushed whole: bytes stored against its
  data + what differs, and what the second save uploaded against what
  differs; needs qemu-system-x86); warm (the cold case again, cache warm,
  beside the floor's local case); prefetch (a cold start with its
  recorded working set against one without); fanout (16 restores at once on
  this host, of one image and of 4 images sharing a base: chunks fetched
  against distinct chunks, and time against one alone). --cases runs only
  those named.

postcopy bench encryption [--pages N] [--rounds R] [--seed S] [--json]
  What sealing TCP data channels costs: fault p50 and bulk GB/s over TCP,
  plaintext and sealed, interleaved R rounds (default 3); medians and ratios.

postcopy bench fanout [--pages N] [--destinations D] [--rounds R] [--transport unix,tcp] [--json]
  One source process feeding D restores at once (default 16; N pages each,
  default 16384), each touching every page once in its own random order with
  the background on, against one restore alone, interleaved R rounds
  (default 3): the bytes a second all took together against the floor's bulk
  case on the same transport, each destination's fault p99 against the lone
  one's, and the source's CPU per GiB served.

postcopy bench compression [--pages N] [--rounds R] [--images synthetic,guest] [--json]
  What packed runs save across a 1 Gbit/s link (a veth pair into a network
  namespace, made and removed here): each image restored whole with packed
  runs and with them refused, interleaved R rounds (default 3): bytes on the
  wire over the image's bytes, time to full residency, CPU on both sides per
  GiB. Images: synthetic (N pages, default 65536: zero, text-like, structured
  and random pages) and guest (the QEMU test guest's RAM, saved by QEMU and
  imported; skipped without qemu-system-x86).

Every benchmark but the suite prints a table; --json prints its results as
JSON lines instead, one object per result, for scripts.`;

export const demoUsage = `postcopy demo [--image FILE] [--size SIZE] [--threads N]

  Creates an image of SIZE (default 128M; at least 4M, whole pages: random
  data, zero pages and a hole) unless --image is given; starts a source page
  server in its own process (with a token) and a destination handler; then
  runs a VMM-like program that maps empty guest memory, hands its userfaultfd
  to the handler the way Firecracker does, touches every page from N threads
  (default 4, at most 64) in random order, gives a 1 MiB balloon range back,
  and checks every byte. Prints what happened. An --image must be whole
  4 KiB pages (ERR_USAGE otherwise); the demo ends, saying so, if its VMM
  exits early, and SIGINT/SIGTERM remove its temporary directory.`;

export const qemuUsage = `postcopy qemu import FILE --out DIR|s3://BUCKET/PREFIX/NAME [--tenant-key-file F]
postcopy qemu save --qmp PATH --out DIR|s3://BUCKET/PREFIX/NAME [--leave-running] [--live] [--tenant-key-file F]
postcopy qemu serve --snapshot DIR --connect unix:PATH|tcp:HOST:PORT [--window F:B] [--no-background] [--json]
postcopy qemu restore --snapshot DIR|s3://BUCKET/PREFIX/NAME [--window F:B] [--no-background] [--wait] [--json]
                      [--cache-dir DIR] [--cache-size SIZE] -- QEMU-COMMAND...

  import reads a migration stream QEMU saved itself (migrate "exec:cat >
  FILE") into a snapshot directory: each RAM block as a sparse image (zero
  pages left as holes), the stream's configuration, RAM setup and device state
  exactly as QEMU sent them, and manifest.json (machine type, blocks). A
  stream that is not QEMU's (ERR_QEMU_STREAM_INVALID), one cut short
  (ERR_QEMU_STREAM_TRUNCATED), or one using compression, multifd or xbzrle
  (ERR_UNSUPPORTED, naming it) is refused. Prints the manifest as one JSON
  line.

  save does the same from a running QEMU: it connects to its QMP socket, stops
  the guest (as virsh save does: its memory and its device state are then of
  one instant) and migrates it into a socket of this process. The guest is
  left paused, as after any migration; --leave-running resumes it once the
  snapshot is whole (a save that fails resumes it too). --live saves without
  stopping it (QEMU's precopy, while the guest writes its memory): such a
  snapshot is only as consistent as QEMU's dirty-page tracking, and under TCG
  a guest saved live while it wrote its memory was seen to oops when restored
  (as it was from QEMU's own live migrate "exec:cat > FILE"). Use it only
  where a pause cannot be afforded and restores are checked.

  serve restores a snapshot into a destination QEMU lazily, as its postcopy
  migration source. Start that QEMU with -incoming defer (same machine and
  devices), turn postcopy-ram on (migrate-set-capabilities) and run
  migrate-incoming with the address; serve connects there. The guest runs as
  soon as its device state is in; each RAM page it touches is asked for on
  the return path and sent first (with --window pages after it), the rest
  streams in the background. Prints what happened when the destination has
  every page: requests, request-to-page latency, pages on demand / window /
  background / zero, bytes, time to the guest running and to full residency.

  --out s3://BUCKET/PREFIX/NAME writes the snapshot to a snapshot store
  (docs/STORE.md) instead: its RAM blocks as the image's regions, the rest as
  files kept with it, sealed with --tenant-key-file's key when given; the
  JSON line then says what was pushed. restore
  --snapshot s3://... fetches only the device state first; QEMU runs on it,
  and its RAM comes from the store as QEMU reads it (through the host's
  chunk cache, every chunk checked), the rest in the background; the report
  says how much was fetched by the time the guest ran.

  restore is the one command for all of that: it starts QEMU-COMMAND (the
  machine the snapshot was taken of) with -incoming defer and a QMP socket of
  its own, turns postcopy-ram on, serves it as above, prints the same
  figures (and the QMP socket's path) and leaves the guest running. QEMU
  runs on after this command; the report names its directory (monitor, log),
  to remove once QEMU has exited. With --wait this command owns QEMU: it
  waits for QEMU to exit, and Ctrl-C stops QEMU and removes its directory
  (as an interrupt before the guest runs does in any case).
${loggingUsage}`;

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
  the store lacks, side by side in packs of about 8 MiB (a restore fetches
  neighbours with one ranged GET), then the manifest. --parent NAME: the image it derives
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
  gc deletes the chunks and packs no image names that are older than --grace
  (default 1h), safely beside pushes under way.`;

export const usage = `usage: postcopy <command> [options]   (postcopy <command> --help: that command's usage)

commands:
  demo       move a real image from a source process to a destination and show what happened
  serve      serve an image to destinations
  handle     be the page-fault handler VMMs hand their userfaultfd to (Firecracker style)
  restore    restore an image (from a source, a file or a store) into memory or a file
  bench      the benchmark suite (quick; --full for everything), or one benchmark:
             latency, throughput, encryption, compression, fanout, local, localhost, live,
             qemu, store
  qemu       QEMU snapshots: import a stream QEMU saved, save a running QEMU, serve a
             snapshot to a QEMU, or restore one into a QEMU started for it
  store      images in a snapshot store on S3-compatible object storage: push, ls, rm, gc

${serveUsage}

${restoreUsage}

${handleUsage}

${benchUsage}

${demoUsage}

${qemuUsage}

${storeUsage}
`;

/** What `postcopy` alone prints: the commands, and where the rest is. */
export const shortUsage = usage.slice(0, usage.indexOf('\n\n', usage.indexOf('commands:'))) + "\n\npostcopy --help prints every command's usage.";

export const usageOf: Record<string, string> = {
  serve: serveUsage,
  restore: restoreUsage,
  handle: handleUsage,
  bench: benchUsage,
  demo: demoUsage,
  qemu: qemuUsage,
  store: storeUsage,
};
