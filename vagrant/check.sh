#!/usr/bin/env bash
# The checks of `xdectl lab ping`, in the Vagrant lab: run as root on sled N
# (1 or 2). Guest gN pings the other sled's guest, the gateway and the
# internet host behind boundary services (from its external address); then
# the port's counters are printed. Exit status: the number of failed checks.
#
# The other sled may not be up yet when this runs during `vagrant up`
# (VirtualBox brings machines up one after another): its checks are then
# skipped, unless XDE_CHECK_STRICT=1, which counts them as failures.
set -uo pipefail

n=${1:?usage: check.sh 1|2}
case "$n" in 1|2) ;; *) echo "check.sh: sled number must be 1 or 2" >&2; exit 2 ;; esac
other=$(( 3 - n ))
guest="g$n"
src=${XDE_SRC:-/xde}
strict=${XDE_CHECK_STRICT:-0}
wait_s=${XDE_CHECK_WAIT:-30}
GW_IP=172.30.0.5
OUTSIDE=203.0.113.1
failed=0

in_guest() { nsenter --net="/run/netns/$guest" "$@"; }

check() {
  local what=$1 addr=$2 out
  if out=$(in_guest ping -c 3 -i 0.2 -W 1 -q "$addr" 2>&1); then
    echo "  ok   $what: $(echo "$out" | grep 'packets transmitted')"
  else
    echo "  FAIL $what: $(echo "$out" | grep 'packets transmitted' || echo "$out")"
    failed=$(( failed + 1 ))
  fi
}

# Whether the other sled answers on the underlay, waiting up to wait_s.
peer_up() {
  local deadline=$(( SECONDS + wait_s ))
  until ping -6 -c 1 -W 1 -q "fd00:$other::1" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}

if [ ! -e "/run/netns/$guest" ]; then
  echo "check: no guest namespace $guest: provision this sled first" >&2
  exit 1
fi
echo "checks on sled$n (guest $guest, 10.0.0.$n):"
if peer_up; then
  check "guest $guest -> guest g$other (across sleds)" "10.0.0.$other"
elif [ "$strict" = 1 ]; then
  echo "  FAIL guest $guest -> guest g$other: sled$other does not answer on fd00:$other::1"
  failed=$(( failed + 1 ))
else
  echo "  skip guest $guest -> guest g$other: sled$other is not up yet" \
       "(all VMs up: vagrant provision --provision-with check)"
fi
check "guest $guest -> gateway" "$GW_IP"
check "guest $guest -> internet (boundary services)" "$OUTSIDE"
echo "  sled$n xde0 counters:"
"$src/.venv/bin/xdectl" stats xde0 | sed 's/^/  /'
exit "$failed"
