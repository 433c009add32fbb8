#!/usr/bin/env bash
# Provision one machine of the Vagrant lab (see Vagrantfile): ROLE is
# sled1, sled2 or boundary. Runs as root inside the VM; safe to run again.
#
# The addresses are those of the namespace lab (xdelab/lab.py): sled N has
# underlay address fd00:N::1 and guest gN (10.0.0.N, MAC a8:40:25:ff:00:0N)
# in VPC VNI 10; boundary services are fd00:99::1 in VNI 99, with the
# internet (namespace inet, 203.0.113.1) behind them; g1 leaves from its
# SNAT IP 198.51.100.10 (ports 1024-2047), g2 from its floating IP
# 198.51.100.20.
set -euo pipefail

role=${1:?usage: provision.sh sled1|sled2|boundary}
src=${XDE_SRC:-/xde}                 # the project, synced in by Vagrant
nets=(192.168.61 192.168.62)         # the underlay networks' IPv4 subnets (Vagrantfile)
VNI=10
BSVC_VNI=99
BSVC_ADDR=fd00:99::1
BSVC_N=99
GW_MAC=a8:40:25:00:00:01
GW_IP=172.30.0.5
SUBNET=10.0.0.0/24
OUTSIDE=203.0.113.1                  # the internet host, in namespace inet on the boundary
BSVC_EXT_IP=203.0.113.254
EXTERNAL_NET=198.51.100.0/24
# each sled's guest: its external addresses (create's options) and the
# boundary's NAT entry for them
external_opts() { if [ "$1" = 1 ]; then echo "--snat-ip 198.51.100.10 --snat-start 1024 --snat-end 2047"; else echo "--floating-ip 198.51.100.20"; fi; }
nat_target() { if [ "$1" = 1 ]; then echo 198.51.100.10:1024-2047; else echo 198.51.100.20; fi; }

log() { echo "provision[$role]: $*"; }

# The NIC that holds this machine's address on underlay network $1 (0 or 1).
underlay_nic() {
  local prefix=${nets[$1]}. nic
  nic=$(ip -o -4 addr show | awk -v p="$prefix" 'index($4, p) == 1 { print $2; exit }')
  if [ -z "$nic" ]; then
    echo "provision[$role]: no NIC with an address in ${prefix}0/24 (underlay $(( $1 + 1 )))" >&2
    exit 1
  fi
  echo "$nic"
}

# IPv6 on both underlays: link addresses fd10:1::N and fd10:2::N, the
# underlay address on lo, and ECMP routes over both networks.
underlay() {
  local n=$1 addr=$2 i nic
  for i in 0 1; do
    nic=$(underlay_nic "$i")
    ip link set "$nic" up
    ip -6 addr replace "fd10:$(( i + 1 ))::$n/64" dev "$nic" nodad
    sysctl -qw "net.ipv6.conf.$nic.accept_redirects=0"
  done
  ip -6 addr replace "$addr/128" dev lo
  # hash on the outer UDP ports too: xde varies them by flow
  sysctl -qw net.ipv6.fib_multipath_hash_policy=1
  sysctl -qw net.ipv6.conf.all.accept_redirects=0
}

# An ECMP route to $1 through the gateways fd10:1::$2 and fd10:2::$2.
route_via() {
  ip -6 route replace "$1/128" \
    nexthop via "fd10:1::$2" dev "$(underlay_nic 0)" \
    nexthop via "fd10:2::$2" dev "$(underlay_nic 1)"
}

boundary() {
  local xdectl="$src/.venv/bin/xdectl" n
  command -v make >/dev/null || { apt-get update -qq && apt-get install -y -qq make >/dev/null; }
  log "make setup (packages, kernel headers, bpffs, the venv)"
  make -C "$src" setup

  underlay "$BSVC_N" "$BSVC_ADDR"
  # boundary services route what they decapsulate (docs/design.md,
  # "Boundary services"); this machine also routes between the sleds
  sysctl -qw net.ipv6.conf.all.forwarding=1 net.ipv4.ip_forward=1 \
    net.ipv4.conf.all.rp_filter=0
  for n in 1 2; do
    route_via "fd00:$n::1" "$n"
  done

  # The internet: a namespace on the external link.
  [ -e /run/netns/inet ] || ip netns add inet
  if ! ip link show ext >/dev/null 2>&1; then
    ip link add ext type veth peer name bsvc netns inet
  fi
  ip addr replace "$BSVC_EXT_IP/24" dev ext
  ip link set ext up
  ip route replace unreachable "$EXTERNAL_NET"
  ip -n inet link set lo up
  ip -n inet link set bsvc up
  ip -n inet addr replace "$OUTSIDE/24" dev bsvc
  ip -n inet route replace "$EXTERNAL_NET" via "$BSVC_EXT_IP"
  if ! systemctl is-active --quiet xde-inet.service; then
    systemctl reset-failed xde-inet.service 2>/dev/null || true
    systemd-run --unit=xde-inet --working-directory="$src" -p Restart=on-failure \
      nsenter --net=/run/netns/inet /usr/bin/python3 -m xdelab.whoami "$OUTSIDE" 80
  fi

  if ! "$xdectl" boundary show --json | grep -q '"up": true'; then
    log "xdectl boundary up over $(underlay_nic 0) and $(underlay_nic 1)"
    "$xdectl" boundary up --underlay "$(underlay_nic 0)" --underlay "$(underlay_nic 1)" \
      --underlay-addr "$BSVC_ADDR" --external ext --vni "$BSVC_VNI"
  fi
  for n in 1 2; do
    "$xdectl" boundary set-nat "$(nat_target "$n")" "fd00:$n::1" "$VNI" "a8:40:25:ff:00:0$n"
  done
  log "router of both underlays, boundary services $BSVC_ADDR, the internet $OUTSIDE behind them"
}

sled() {
  local n=$1 other=$(( 3 - $1 ))
  local addr="fd00:$n::1" guest="g$n" mac="a8:40:25:ff:00:0$n" ip="10.0.0.$n"
  local xdectl="$src/.venv/bin/xdectl"

  command -v make >/dev/null || { apt-get update -qq && apt-get install -y -qq make >/dev/null; }
  log "make setup (packages, kernel headers, bpffs, the venv)"
  make -C "$src" setup

  underlay "$n" "$addr"
  route_via "fd00:$other::1" "$BSVC_N"   # the other sled, through the switch
  route_via "$BSVC_ADDR" "$BSVC_N"

  local u1 u2
  u1=$(underlay_nic 0)
  u2=$(underlay_nic 1)
  if ! "$xdectl" list | awk 'NR > 1 { print $1 }' | grep -qx xde0; then
    log "xdectl create xde0 over $u1 and $u2"
    "$xdectl" create xde0 --underlay "$u1" --underlay "$u2" --mac "$mac" --ip "$ip" \
      --gateway-mac "$GW_MAC" --gateway-ip "$GW_IP" --boundary-services "$BSVC_ADDR" \
      --boundary-vni "$BSVC_VNI" --vni "$VNI" --underlay-addr "$addr" --vpc-subnet "$SUBNET"
  fi
  # shellcheck disable=SC2046 # the options are words
  "$xdectl" set-external-ips xde0 $(external_opts "$n")
  "$xdectl" set-v2p "10.0.0.$other" "a8:40:25:ff:00:0$other" "fd00:$other::1" "$VNI"

  # The guest: a namespace holding the port's guest end, as in the lab.
  [ -e "/run/netns/$guest" ] || ip netns add "$guest"
  if ip link show xde0 >/dev/null 2>&1; then
    ip link set xde0 netns "$guest"
  fi
  ip -n "$guest" link set lo up
  ip -n "$guest" addr replace "$ip/24" dev xde0
  ip -n "$guest" link set xde0 up
  ip -n "$guest" route replace "$GW_IP/32" dev xde0 scope link
  ip -n "$guest" route replace default via "$GW_IP" dev xde0
  log "port xde0 ($ip, $mac) in namespace $guest; V2P for 10.0.0.$other at fd00:$other::1"
}

case "$role" in
  boundary) boundary ;;
  sled1) sled 1 ;;
  sled2) sled 2 ;;
  *) echo "provision.sh: unknown role '$role' (sled1, sled2 or boundary)" >&2; exit 2 ;;
esac
