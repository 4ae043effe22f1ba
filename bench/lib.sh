# bench/lib.sh: helpers the bench scripts source (after setting $work).

# Pids the script started, stopped by stop_pids in the order they were
# started (`rackblock up` stops its own daemons in order on SIGTERM).
pids=()

# SIGTERM every pid of $pids, wait up to 60 s for each, then SIGKILL.
stop_pids() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}

# Device images and logs of several GiB would stay behind: every file over
# 16 MiB under $work is deleted (logs and JSON stay), unless
# BENCH_KEEP_WORK=1.
drop_images() {
  [ "${BENCH_KEEP_WORK:-0}" = 1 ] || find "$work" -type f -size +16M -delete 2>/dev/null || true
}
