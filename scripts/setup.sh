#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian/Ubuntu machine for xde: distribution
# packages, kernel headers for bcc, bpffs, and the project's venv.
#   scripts/setup.sh [lab|test|bench]
# lab (the default) installs what the datapath and the namespace lab need;
# test adds every tool the test suite runs; bench adds the profilers.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-lab}

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (sudo make setup): it installs packages and mounts bpffs" >&2
  exit 1
fi

arch=$(dpkg --print-architecture)
# The datapath (bcc and the headers it compiles against) and the lab (ip and
# ping are what an operator types in its namespaces; the guests configure
# themselves with ISC dhclient, over DHCPv4 and DHCPv6, from the gateway;
# the fleet lab keeps its desired state in etcd).
packages=(python3-bpfcc python3-venv "linux-headers-$arch" iproute2 iputils-ping
          isc-dhcp-client etcd-server)
extras=""
case "$what" in
  lab) ;;
  test|bench)
    # sysctl (procps) and ip in test namespaces; captures and their decoder;
    # TCP load; Open vSwitch as a foreign Geneve peer; systemd-analyze,
    # vagrant and shellcheck check deploy/ and vagrant/; a real Prometheus;
    # rdisc6 (ndisc6) asks the gateway for a router advertisement; openssl
    # makes the certificates of the etcd the TLS tests start.
    packages+=(procps ethtool tcpdump tshark iperf3 openvswitch-switch systemd
               prometheus vagrant vagrant-libvirt shellcheck ndisc6 openssl)
    extras="test"
    if [ "$what" = bench ]; then
      packages+=(bpftool linux-perf)
      extras="test,bench"
    fi ;;
  *) echo "setup: unknown set '$what' (lab, test or bench)" >&2; exit 1 ;;
esac

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/{build,source}. Kernels without
# their own headers package (custom or CI kernels) get the distribution's
# current headers: the programs only use UAPI headers, which are stable.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
  build=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
  common=${build%-"$arch"}-common
  [ -d "$build" ] && [ -d "$common" ] || { echo "setup: no linux-headers found under /usr/src" >&2; exit 1; }
  echo "setup: using $build for kernel $(uname -r)"
  mkdir -p "$kdir"
  ln -sfn "$build" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
fi

if ! grep -qs " /sys/fs/bpf bpf " /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf
fi

# A venv from the distribution's Python sees the distribution's bcc.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import bcc" 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-${extras:-base}
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
