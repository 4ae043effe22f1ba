#!/usr/bin/env python3
"""bench/failover-timeline.py LOG LOG_DIR: the timeline of each kill of
bench/failover-nbd.sh, from the test's FIO_FAILOVER_KILL / _PAUSE lines and
the unit's logs the test kept (FIO_FAILOVER_LOG_DIR): milliseconds after
the kill at which the killed node was recorded Down, the promotion was
proposed, the take-over started, the held-index recovery ended, the new
primary served, its new secondary was at the replication queue's front
(writes acknowledged again) and the pair was reported in sync. Only lines of partition 0 (vol0 is the only volume) and the control plane's count.
Prints one row per kill, slowest first, and the median of each step."""
import datetime, glob, os, re, statistics, sys

log, log_dir = sys.argv[1:3]
ansi = re.compile(r"\x1b\[[0-9;]*m")
stamp = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z")
kills, pauses = [], {}
for line in open(log, errors="replace"):
    m = re.search(r"FIO_FAILOVER_KILL rep=(\d+) victim=(\S+) epoch=(\d+) unix_ms=(\d+)", line)
    if m:
        kills.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
    m = re.search(r"FIO_FAILOVER_PAUSE rep=(\d+) victim=\S+ pause_ms=([\d.]+)(?: wal_fill_at_kill=(\S+))?", line)
    if m:
        pauses[int(m.group(1))] = (float(m.group(2)), m.group(3))
events = []  # (unix_ms, source, text)
for path in sorted(glob.glob(os.path.join(log_dir, "*.log"))):
    source = os.path.basename(path)[:-4]
    for raw in open(path, errors="replace"):
        line = ansi.sub("", raw).strip()
        m = stamp.match(line)
        if not m:
            continue
        ts = m.group(1)
        whole, _, frac = ts.partition(".")
        t = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
        ms = t.timestamp() * 1000 + (float("0." + frac) * 1000 if frac else 0)
        events.append((ms, source, line))
events.sort()
part0 = re.compile(r"PartitionId \{ volume: \d+, index: 0 \}")
steps = [
    ("down", lambda s, l: "records a transition" in l and "Down" in l),
    ("proposed", lambda s, l: "proposing a role change" in l),
    ("takeover", lambda s, l: "taking the partition over as primary" in l and part0.search(l)),
    ("recovered", lambda s, l: "recovered from" in l and part0.search(l)),
    ("serving", lambda s, l: ("serving as primary" in l or "taken over in place" in l) and part0.search(l)),
    # Writes acknowledged again: the new secondary at the replication
    # queue's front (since the tail is flushed instead of shipped, right
    # after the catch-up's jump; before, after the whole tail was shipped,
    # logged "secondary in sync").
    ("front", lambda s, l: ("secondary at the queue's front" in l
                            or ("secondary in sync" in l and "reported" not in l))
     and part0.search(l)),
    # The pair in sync, reported to the control plane (since the tail is
    # flushed instead of shipped: once its flush commit is confirmed).
    ("in_sync", lambda s, l: "secondary in sync, reported to the control plane" in l and part0.search(l)),
]
rows = []
for i, (rep, victim, epoch, at) in enumerate(kills):
    end = kills[i + 1][3] if i + 1 < len(kills) else float("inf")
    row = {"rep": rep, "victim": victim, "pause": pauses.get(rep, (float("nan"), None))[0],
           "fill": pauses.get(rep, (None, None))[1]}
    for name, match in steps:
        hit = next((ms for ms, s, l in events if at <= ms < end and s != victim and match(s, l)), None)
        row[name] = None if hit is None else round(hit - at)
    rows.append(row)
cols = ["pause"] + [n for n, _ in steps]
print("rep victim  fill  " + " ".join(f"{c:>9}" for c in cols))
for r in sorted(rows, key=lambda r: -r["pause"]):
    cells = " ".join(f"{'-' if r[c] is None else int(r[c]):>9}" for c in cols)
    print(f"{r['rep']:>3} {r['victim']:<7} {r['fill'] or '-':>5} {cells}")
med = []
for c in cols:
    vals = [r[c] for r in rows if r[c] is not None]
    med.append(f"{statistics.median(vals):>9.0f}" if vals else f"{'-':>9}")
print("median            " + " ".join(med))
