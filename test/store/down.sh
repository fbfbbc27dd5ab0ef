#!/usr/bin/env bash
# Stops the object store test/store/up.sh started (gateway, OSD, monitor) and
# removes its data.
set -uo pipefail
DIR=${POSTCOPY_STORE_DIR:-/tmp/uffd-postcopy-store}
for name in rgw osd mon; do
  pidfile=$DIR/$name.pid
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null
  # The OSD takes a few seconds to stop; bounded, then killed.
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
done
rm -rf "$DIR"
echo "store: down" >&2
