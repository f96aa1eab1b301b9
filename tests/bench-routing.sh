#!/usr/bin/env bash
# The routing benchmark, in one run (root: network namespaces, dockerd, BIRD 2):
#  1. between two containers on the namespace test bed, throughput (TCP, MEGABYTES over HTTP)
#     and round trips (100 pings): over a plain route (same LAN), through linkdns's VXLAN
#     tunnel (hosts on two LANs) and through a router that learned the routes over BGP;
#  2. a host's routing work (wall time and CPU of a reconciliation, and in steady state the
#     share of a core) at 20 and 200 peers, on the LAN and behind a router.
# Figures only: nothing here passes or fails on time.
#
#   bash tests/bench-routing.sh [MEGABYTES=400] [PEERS=20,200]
set -euo pipefail
cd "$(dirname "$0")/.."
megabytes="${1:-400}"
peers="${2:-20,200}"
if [ "$(id -u)" != 0 ]; then
  echo "bench-routing.sh: needs root (network namespaces, dockerd, bird)" >&2
  exit 1
fi
for tool in dockerd bird ip iptables; do
  command -v "$tool" >/dev/null || { echo "bench-routing.sh: $tool is missing (apt-get install docker.io bird2 iproute2 iptables)" >&2; exit 1; }
done
cargo bench -q -p linkdns --bench cluster -- paths "$megabytes" 2>/dev/null | grep -v '^$'
cargo bench -q -p linkdns-routes --bench reconcile -- "$peers" 2>/dev/null | grep -v '^$'
