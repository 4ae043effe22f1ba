# bench/lib.sh: helpers the bench scripts source (after setting $work).

# Pids the script started, stopped by stop_pids in the order they were
# started (`rackblock up` stops its own daemons in order on SIGTERM).
pids=()

# SIGTERM every pid of $pids, wait up to 60 s for each, then SIGKILL.
stop_pids() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "${0##*/}: pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-80)) did not stop within 60 s of SIGTERM: SIGKILL" >&2
      kill -9 "$pid" 2>/dev/null || true
    fi
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

# write_sled_rack DEV_BYTES DEVICE...: the one-sled rack of the sled
# benches in $work: sled-1 (data 127.0.1.61:17100, admin 127.0.0.1:17101)
# with the given device files of DEV_BYTES each, a second sled on a small
# file (the rack's 1+1 code needs two), one head node that never starts;
# and sled-1's config ($work/sled.toml, scrubber paused).
write_sled_rack() {
  local dev_bytes=$1; shift
  touch "$work/other.img"; truncate -s $((128 * 1024 * 1024)) "$work/other.img"
  {
    cat <<TOML
[unit]
name = "bench"
column_size_bytes = 67108864
erasure_codes = ["1+1"]
[[head_node]]
id = "hn-1"
address_a = "127.0.1.1:17000"
address_b = "127.0.2.1:17000"
admin = "127.0.0.1:17001"
[[sled]]
id = "sled-1"
address_a = "127.0.1.61:17100"
address_b = "127.0.2.61:17100"
admin = "127.0.0.1:17101"
TOML
    for device in "$@"; do
      printf '[[sled.device]]\npath = "%s"\nsize_bytes = %s\n' "$device" "$dev_bytes"
    done
    cat <<TOML
[[sled]]
id = "sled-2"
address_a = "127.0.1.62:17100"
address_b = "127.0.2.62:17100"
admin = "127.0.0.1:17102"
[[sled.device]]
path = "$work/other.img"
size_bytes = $((128 * 1024 * 1024))
TOML
  } >"$work/rack.toml"
  # The unit's keys (credentials/ beside the rack): the sled needs its own,
  # `sled bench` authenticates with the unit key (SECURITY.md).
  "$bin" rack init-credentials --rack "$work/rack.toml" >/dev/null
  cat >"$work/sled.toml" <<TOML
rack_file = "$work/rack.toml"
sled_id = "sled-1"
scrub_bytes_per_second = 0
scrub_pass_interval_ms = 60000
TOML
}

# Path of the end-to-end test binary (`tests`, target `it`) that
# `cargo test "$@" -p tests --test it --no-run` builds (pass --release for a
# release one); the benches that drive an ignored e2e test run it directly.
e2e_test_bin() {
  cargo test "$@" -q -p tests --test it --no-run --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "it" and m.get("executable"):
        print(m["executable"])' | tail -1
}
