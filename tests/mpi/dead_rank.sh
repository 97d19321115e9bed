#!/usr/bin/env bash
# A rank dies mid-job: mpirun must end the whole job, non-zero and within LIMIT seconds, with
# no rank left waiting (kept/dist/mpi_communicator.hpp, "A dead rank").
#   dead_rank.sh MODE LIMIT PROGRAM MPIEXEC [MPIEXEC ARGS...]
# runs MPIEXEC ARGS... PROGRAM MODE DIR (tests/mpi/dead_rank.cpp) under `timeout`.
set -euo pipefail
mode=$1 limit=$2 program=$3
shift 3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() {
  echo "dead_rank.sh ($mode): FAILED: $*" >&2
  exit 1
}

start=$(date +%s%N)
set +e
timeout --kill-after=5 "$limit" "$@" "$program" "$mode" "$work" >"$work/log" 2>&1
status=$?
set -e
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
cat "$work/log"

[[ -s $work/rank0.pid ]] || fail "rank 0 never reached the collective (no $work/rank0.pid)"
pid=$(<"$work/rank0.pid")
# A moment's grace for the process to be reaped once mpirun is gone.
for _ in 1 2 3 4 5 6 7 8 9 10; do
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.2
done
if kill -0 "$pid" 2>/dev/null; then
  kill -KILL "$pid" 2>/dev/null || true  # do not leave it behind
  fail "rank 0 (pid $pid) is still running 2 s after mpirun exited with status $status"
fi
# By the clock, not the status: mpirun passes on the dead rank's status, 137 for SIGKILL, which
# is also what `timeout` reports after its own SIGKILL.
((elapsed_ms < limit * 1000)) || fail "mpirun still ran after ${limit} s (stopped by timeout)"
((status != 0)) || fail "mpirun exited 0 although rank 1 died"
! grep -q "all_reduce_sum returned" "$work/log" || fail "rank 0's all_reduce_sum returned"
echo "dead_rank.sh ($mode): mpirun exited with status $status after ${elapsed_ms} ms" \
  "(limit ${limit} s); rank 0 (pid $pid) is gone"
