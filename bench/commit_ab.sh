#!/usr/bin/env bash
# 3 rounds: feathers a; agor a/s with --sqlite-commit thread vs loop (default)
export AGOR_PROJECT=${AGOR_PROJECT:?a checkout with .venv}
cd "${BENCH_PEERS:?a writable copy of ../shared/bench-peers with bench/run_one_args.patch applied}"
for i in 1 2 3; do
  ./bench.sh feathers a
  AGOR_SERVE_ARGS="--sqlite-commit thread" ./run_one.sh agor a-thr --sessions 100 --clients 200 --rate 10 --duration 15 --warmup 3 --drain 5
  ./run_one.sh agor a-loop --sessions 100 --clients 200 --rate 10 --duration 15 --warmup 3 --drain 5
  AGOR_SERVE_ARGS="--sqlite-commit thread" ./run_one.sh agor s-thr --op stream --sessions 100 --clients 200 --rate 10 --duration 15 --warmup 3 --drain 5
  ./run_one.sh agor s-loop --op stream --sessions 100 --clients 200 --rate 10 --duration 15 --warmup 3 --drain 5
done
