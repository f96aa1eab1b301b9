#!/usr/bin/env bash
# DNS benchmark: linkdns beside Knot DNS, both serving the same 10,000 names on loopback.
# First each server has one UDP thread (--dns-threads 1, Knot's udp-workers 1) pinned to one
# core, driven by dnsperf pinned to the other core; then each has two UDP threads on both cores
# and dnsperf runs beside them (this machine has no third core: it shows that the threads share
# the load, not what two cores answer alone). Prints, for each server:
#   - server CPU microseconds per answered query at a fixed 20,000 queries/s (10 s)
#   - queries lost in that run
#   - max queries/s (dnsperf flat out, 10 s)
#   - peak RSS (VmHWM)
# Needs root for nothing; needs dnsperf, knot, dnsutils (apt-get install dnsperf knot dnsutils).
# Only loopback is ever a target. Usage: tests/bench-dns.sh [names] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."

NAMES=${1:-10000}
SECONDS_PER_RUN=${2:-10}
RATE=20000
LINKDNS_PORT=5353
KNOT_PORT=5354
SERVER_CORE=1
CLIENT_CORE=0

for tool in dnsperf knotd dig taskset; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing (apt-get install dnsperf knot dnsutils util-linux)" >&2; exit 1; }
done

cargo build --release -q -p linkdns --bins
BIN=target/release
WORK=$(mktemp -d /tmp/linkdns-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN/linkdns-bench-load" --data-dir "$WORK/linkdns" --names "$NAMES" --zone "$WORK/cluster.zone" --queries "$WORK/queries.txt"

start_servers() { # udp-threads cores
  LINKDNS_LOG=warn taskset -c "$2" "$BIN/linkdns" run --data-dir "$WORK/linkdns" --node-name bench \
    --dns-listen 127.0.0.1:$LINKDNS_PORT --admin-listen 127.0.0.1:0 --peer-listen 127.0.0.1:0 \
    --dns-threads "$1" --docker "unix://$WORK/no-docker.sock" --upstream 127.0.0.1:9 2>>"$WORK/linkdns.log" &
  PIDS+=($!); LINKDNS_PID=$!
  mkdir -p "$WORK/knot"
  cat > "$WORK/knot.conf" <<EOF
server:
    listen: 127.0.0.1@$KNOT_PORT
    rundir: "$WORK/knot"
    udp-workers: $1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/knot"
log:
  - target: stderr
    any: warning
zone:
  - domain: cluster
    file: "$WORK/cluster.zone"
    storage: "$WORK/knot"
    journal-content: none
    zonefile-sync: -1
EOF
  taskset -c "$2" knotd -c "$WORK/knot.conf" 2>>"$WORK/knot.log" &
  PIDS+=($!); KNOT_PID=$!
  wait_answer $LINKDNS_PORT svc1.cluster
  wait_answer $KNOT_PORT svc1.cluster
}

stop_servers() {
  kill "$LINKDNS_PID" "$KNOT_PID"
  wait "$LINKDNS_PID" "$KNOT_PID" 2>/dev/null || true
}

wait_answer() { # port name
  for _ in $(seq 100); do
    if dig +short +time=1 +tries=1 @127.0.0.1 -p "$1" "$2" A | grep -q .; then return 0; fi
    sleep 0.1
  done
  echo "bench: server on port $1 does not answer $2" >&2; exit 1
}

# CPU time of every thread of a process in ns, from the scheduler's own accounting
# (/proc/PID/task/*/schedstat, first field): exact, unlike the tick-sampled utime/stime.
cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%d", s}'; }

measure() { # label pid port client-cores clients-at-the-fixed-rate
  local label=$1 pid=$2 port=$3 cores=$4 clients=$5
  # warm-up; -c: client sockets (SO_REUSEPORT spreads several over the UDP threads)
  taskset -c "$cores" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" -l 2 -Q $RATE -c "$clients" >/dev/null 2>&1
  local t0 t1 out completed lost cpu_us per_query max_qps rss
  t0=$(cpu_ns "$pid")
  out=$(taskset -c "$cores" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" -l "$SECONDS_PER_RUN" -Q $RATE -c "$clients" 2>&1)
  t1=$(cpu_ns "$pid")
  completed=$(echo "$out" | awk '/Queries completed:/ {print $3}')
  lost=$(echo "$out" | awk '/Queries lost:/ {print $3}')
  cpu_us=$(( (t1 - t0) / 1000 ))
  per_query=$(awk -v c="$cpu_us" -v q="$completed" 'BEGIN { printf "%.1f", c / q }')
  out=$(taskset -c "$cores" dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/queries.txt" -l "$SECONDS_PER_RUN" -q 2000 -c 4 2>&1)
  max_qps=$(echo "$out" | awk '/Queries per second:/ {printf "%d", $4}')
  rss=$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")
  printf "%-8s %22s %14s %10s %12s\n" "$label" "$per_query" "$lost" "$max_qps" "$rss"
  PER_QUERY[$label]=$per_query
  MAX_QPS[$label]=$max_qps
}
declare -A PER_QUERY MAX_QPS

header() {
  printf "%-8s %22s %14s %10s %12s\n" server "cpu_us/query@${RATE}" "lost@${RATE}" "max_qps" "peak_rss_MB"
}
ratio() { # [targets]
  awk -v lc="${PER_QUERY[linkdns]}" -v kc="${PER_QUERY[knot]}" \
      -v lq="${MAX_QPS[linkdns]}" -v kq="${MAX_QPS[knot]}" -v what="${1:-}" 'BEGIN {
    t = what == "targets"
    printf "linkdns/knot: cpu per query %.2fx%s, max q/s %.2fx%s\n", lc / kc, t ? " (target <= 0.80)" : "", lq / kq, t ? " (target >= 1.20)" : ""
  }'
}

echo "names: $NAMES   fixed rate: $RATE q/s for ${SECONDS_PER_RUN}s"
echo "-- one UDP thread each, servers on core $SERVER_CORE, dnsperf on core $CLIENT_CORE"
start_servers 1 $SERVER_CORE
header
measure linkdns "$LINKDNS_PID" $LINKDNS_PORT $CLIENT_CORE 1
measure knot "$KNOT_PID" $KNOT_PORT $CLIENT_CORE 1
# Issue 12's targets, in the same run: CPU per answered query <= 0.8x Knot's, max q/s >= 1.2x.
ratio targets
stop_servers

echo "-- two UDP threads each (--dns-threads 2, udp-workers 2), servers and dnsperf on cores 0-1"
start_servers 2 0-1
header
measure linkdns "$LINKDNS_PID" $LINKDNS_PORT 0-1 4
measure knot "$KNOT_PID" $KNOT_PORT 0-1 4
ratio
stop_servers
