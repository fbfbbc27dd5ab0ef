#!/usr/bin/env bash
# A real S3 object store on this host for the tests and the bench: Ceph's
# RADOS gateway from Debian's packages, one monitor, one OSD (bluestore on a
# sparse file), one gateway on 127.0.0.1. Prints the endpoint and keys as
# NAME=value lines a shell can source (the variables the AWS SDKs read);
# progress goes to stderr. Started once, it is reused (npm run store:down
# stops it). Needs root (apt-get, daemons).
#
#   eval "$(npm run --silent store:up)"
set -euo pipefail

DIR=${POSTCOPY_STORE_DIR:-/tmp/uffd-postcopy-store}
PORT=${POSTCOPY_STORE_PORT:-7480}
MON_PORT=${POSTCOPY_STORE_MON_PORT:-6789}
ACCESS_KEY=postcopy-test-access
SECRET_KEY=postcopy-test-secret-0123456789abcdefghij
CONF=$DIR/ceph.conf
PY=/usr/bin/python3 # Ceph's tools want Debian's python, not a pyenv one first on PATH

say() { echo "store: $*" >&2; }

print_env() {
  echo "AWS_ACCESS_KEY_ID=$ACCESS_KEY"
  echo "AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
  echo "AWS_REGION=us-east-1"
  echo "AWS_ENDPOINT_URL_S3=http://127.0.0.1:$PORT"
}

answering() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

alive() {
  local pidfile=$1
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

if alive "$DIR/rgw.pid" && answering; then
  say "already up at http://127.0.0.1:$PORT"
  print_env
  exit 0
fi

if ! command -v radosgw >/dev/null || ! command -v ceph-osd >/dev/null || ! command -v ceph-mon >/dev/null; then
  say "installing radosgw, ceph-mon and ceph-osd from Debian's packages"
  # Installing must not start the packages' own daemons on their default ports.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends radosgw ceph-mon ceph-osd >&2
fi

# A store left half up (a crash, a reboot) starts again from nothing: it holds only test data.
bash "$(dirname "$0")/down.sh" >/dev/null 2>&1 || true
rm -rf "$DIR"
mkdir -p "$DIR"/{run,log,mon/ceph-a,osd/ceph-0,rgw}

FSID=$(cat /proc/sys/kernel/random/uuid)
cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon host = v1:127.0.0.1:$MON_PORT
mon initial members = a
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc secure
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
keyring = $DIR/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
osd crush chooseleaf type = 0
mon allow pool delete = true
mon warn on pool no redundancy = false
paxos propose interval = 0.1
[mon]
mon data = $DIR/mon/ceph-\$id
[osd]
osd data = $DIR/osd/ceph-\$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 21474836480
osd memory target = 1073741824
[client.rgw.gw]
rgw frontends = beast endpoint=127.0.0.1:$PORT tcp_nodelay=1
rgw data = $DIR/rgw
rgw dns name = 127.0.0.1
EOF

start() { # start NAME CMD...: a daemon in the foreground of its own session, its pid kept
  local name=$1
  shift
  setsid "$@" -f -c "$CONF" >"$DIR/log/$name.out" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

ceph_() { timeout 30 env PATH="/usr/bin:$PATH" ceph -c "$CONF" "$@"; }

wait_for() { # wait_for WHAT SECONDS CMD...: bounded by the clock (a probe itself may take a second)
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  while ((SECONDS < deadline)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  say "$what did not happen within ${seconds}s; logs in $DIR/log"
  tail -n 20 "$DIR"/log/* >&2 || true
  exit 1
}

say "monitor"
ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --fsid "$FSID" --addv a "[v1:127.0.0.1:$MON_PORT]" "$DIR/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" >&2
start mon ceph-mon -i a
wait_for "the monitor answering" 30 ceph_ mon stat

say "OSD (bluestore on a sparse file)"
OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_ID=$(ceph_ osd create "$OSD_UUID")
ceph-osd -c "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/osd-mkfs.out" 2>&1
start osd ceph-osd -i "$OSD_ID"
# An OSD that asks the monitor before it holds the monitor's map is refused
# ("wrong fsid") and exits at init (seen on a loaded machine): started again,
# at most three times, while the wait below runs.
osd_up() {
  if ! kill -0 "$(cat "$DIR/osd.pid")" 2>/dev/null && [ "${OSD_STARTS:-1}" -lt 3 ]; then
    OSD_STARTS=$((${OSD_STARTS:-1} + 1))
    say "the OSD exited at start; starting it again ($OSD_STARTS of 3)"
    start osd ceph-osd -i "$OSD_ID"
  fi
  timeout 10 ceph -c "$CONF" osd stat -f json | grep -q '"num_up_osds":1'
}
wait_for "the OSD up" 60 osd_up

say "pools"
# The gateway creates its pools on the first write (seconds); made here, the first PUT is as fast as any.
for pool in .rgw.root default.rgw.control default.rgw.meta default.rgw.log default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
  ceph_ osd pool create "$pool" 8 8 >/dev/null 2>&1
  ceph_ osd pool application enable "$pool" rgw >/dev/null 2>&1 || true
done

say "gateway on 127.0.0.1:$PORT"
start rgw radosgw -n client.rgw.gw
wait_for "the gateway answering" 60 answering
radosgw-admin -c "$CONF" user create --uid=postcopy --display-name=postcopy --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null 2>"$DIR/log/user.out" ||
  radosgw-admin -c "$CONF" user info --uid=postcopy >/dev/null
say "up at http://127.0.0.1:$PORT"
print_env
