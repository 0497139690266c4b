#!/usr/bin/env bash
# usage: [BROKER_URL=...] cluster_bench.sh <label> <nodes 1|2> [driver args...]: agor-actors on PostgreSQL, 1 or 2 daemons
# BROKER_URL: the daemons' --broker; default redis://127.0.0.1:6379/0 (Redis pub/sub); `pg` for
# LISTEN/NOTIFY on the benchmark's own database (the --db URL), or any postgresql://... URL.
# Needs AGOR_PROJECT (a checkout with .venv) and BENCH_PEERS: a copy of ../shared/bench-peers with
# driver2.mjs made by `cp driver.mjs driver2.mjs && patch driver2.mjs < $AGOR_PROJECT/bench/driver2.patch`
# (--url2: every other receiver on the second daemon; --server-pid2: its CPU sampled too).
set -u
LABEL=$1; NODES=$2; shift 2
PG=postgresql+psycopg://postgres@127.0.0.1:5432/test
SCHEMA=bench_$(date +%s%N)
psql -q -h 127.0.0.1 -U postgres test -c "CREATE SCHEMA $SCHEMA" >/dev/null
URL="$PG?options=-csearch_path%3D$SCHEMA"
BROKER=${BROKER_URL:-redis://127.0.0.1:6379/0}
[ "$BROKER" = pg ] && BROKER=$URL
echo "broker: ${BROKER%%://*}" >&2
D1=$(mktemp -d); D2=$(mktemp -d)
"${AGOR_PROJECT:?set AGOR_PROJECT to a checkout with .venv}"/.venv/bin/agor-actors serve --port 3041 --data-dir $D1 --db "$URL" --broker "$BROKER" > /tmp/cb1.log 2>&1 & P1=$!
for i in $(seq 1 100); do [ -s "$D1/token" ] && break; sleep 0.1; done
P2=""
EXTRA=()
if [ "$NODES" = 2 ]; then
  cp $D1/token $D2/token; chmod 600 $D2/token
  "${AGOR_PROJECT:?set AGOR_PROJECT to a checkout with .venv}"/.venv/bin/agor-actors serve --port 3042 --data-dir $D2 --db "$URL" --broker "$BROKER" > /tmp/cb2.log 2>&1 & P2=$!
  for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/3042) 2>/dev/null && break; sleep 0.1; done
  EXTRA=(--url2 http://127.0.0.1:3042 --server-pid2 $P2)
fi
for i in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/3041) 2>/dev/null && break; sleep 0.1; done
sleep 1
cd "${BENCH_PEERS:?set BENCH_PEERS to a copy of ../shared/bench-peers with driver2.mjs}" && node driver2.mjs --proto agor --token "$(cat $D1/token)" --url http://127.0.0.1:3041 --server-pid $P1 "${EXTRA[@]}" --label "cluster:$LABEL" --out results-cluster.jsonl "$@" 2>&1 | head -1
kill $P1 $P2 2>/dev/null; wait 2>/dev/null
psql -q -h 127.0.0.1 -U postgres test -c "DROP SCHEMA $SCHEMA CASCADE" >/dev/null 2>&1
