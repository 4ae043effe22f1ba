#!/usr/bin/env python3
"""The figures of bench/cpu.sh from its fio JSON files and procstat snapshots.

    cpu_report.py WORK OUT_JSON ROUNDS SECONDS COMMIT FS

WORK holds, per target, job and round, `fio/<target>-<job>-r<N>.json` and
three snapshots `snap/<target>-<job>-r<N>-{a,b,c}.json` (bench/procstat.py)
and the job's thread watch `snap/<target>-<job>-r<N>-w.json`:
a before the job, b right after it, c after the unit flushed (POST /flush on
every head node; nothing for the baselines) and `sync -f` of the data file
system. CPU and context switches per I/O are a -> b (the job), plus a -> c
for writes (the job and the flush of what it wrote); disk and /proc/<pid>/io
bytes per host byte are a -> c. Each figure is the median over rounds.

Prints BENCH lines (bench/README.md) and writes OUT_JSON.
"""

import json
import os
import statistics
import sys

# job key -> (metric stem, direction of the host I/O, throughput unit)
JOBS = {
    "w32": ("randwrite4k.qd32", "write", "iops"),
    "r32": ("randread4k.qd32", "read", "iops"),
    "w32p": ("randwrite4k.qd32.1part", "write", "iops"),
    "r32p": ("randread4k.qd32.1part", "read", "iops"),
    "w1": ("randwrite4k.qd1.fsync", "write", "iops"),
    "sw": ("seqwrite1m.qd4", "write", "MB/s"),
    "sr": ("seqread1m.qd4", "read", "MB/s"),
}
ROLES = ["head_node", "sled", "attach", "control"]


def load(path):
    with open(path) as f:
        return json.load(f)


def fio_figures(path, direction):
    job = load(path)["jobs"][0]
    if job["error"] != 0:
        raise SystemExit(f"{path}: fio error {job['error']}")
    side = job[direction]
    out = {"ios": side["total_ios"], "host_bytes": side["io_kbytes"] * 1024,
           "iops": side["iops"], "mb_per_s": side["bw_bytes"] / 1e6}
    if job.get("sync", {}).get("total_ios", 0):
        pct = lambda d, p: d["percentile"][f"{p:.6f}"] / 1000
        # Durable write latency: the write's completion plus its flush's.
        out["p50_us"] = pct(side["clat_ns"], 50) + pct(job["sync"]["lat_ns"], 50)
        out["p99_us"] = pct(side["clat_ns"], 99) + pct(job["sync"]["lat_ns"], 99)
    return out


def proc_deltas(a, b, target, watched):
    """name -> {role, cpu_us, ctxsw, read_bytes, write_bytes} from snapshot a
    to b; a thread's last count is the highest of b and the watch."""
    before = {(p["name"], p["pid"]): p for p in a["procs"] if p["target"] == target}
    out = {}
    for p in b["procs"]:
        q = before.get((p["name"], p["pid"]))
        if p["target"] != target or q is None:
            continue
        last = dict(watched.get(f"{p['name']}:{p['pid']}", {}))
        for tid, n in p["threads"].items():
            last[tid] = max(last.get(tid, 0), n)
        ctx = sum(n - q["threads"].get(tid, 0) for tid, n in last.items())
        io = {k: (p["io"][k] - q["io"][k]) if p["io"] and q["io"] else 0
              for k in ("read_bytes", "write_bytes")}
        out[p["name"]] = {"role": p["role"], "cpu_us": p["cpu_us"] - q["cpu_us"], "ctxsw": ctx, **io}
    return out


def disk_delta(a, b):
    if not a["disk"] or not b["disk"]:
        return None
    return {k: b["disk"][k] - a["disk"][k] for k in ("read_bytes", "write_bytes")}


def measure(work, target, job, rounds):
    """Per round: fio figures, per-process deltas (job, job + flush), disk."""
    stem, direction, _ = JOBS[job]
    out = []
    for r in range(1, rounds + 1):
        base = f"{target}-{job}-r{r}"
        fio_path = f"{work}/fio/{base}.json"
        if not os.path.exists(fio_path):
            continue
        snaps = {s: load(f"{work}/snap/{base}-{s}.json") for s in "abc"}
        watched = load(f"{work}/snap/{base}-w.json")
        out.append({"fio": fio_figures(fio_path, direction),
                    "job": proc_deltas(snaps["a"], snaps["b"], target, watched),
                    "flushed": proc_deltas(snaps["a"], snaps["c"], target, watched),
                    "disk": disk_delta(snaps["a"], snaps["c"])})
    return out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


class Report:
    def __init__(self):
        self.figures = []

    def line(self, metric, value, unit, base, better, comment=None, base_name=None):
        if value is None or base is None:
            print(f"# {metric}: not measured (missing data)")
            return
        if comment:
            print(comment)
        if base:
            ratio = value / base
        else:
            ratio = 1.0 if value == 0 else float("inf")
        print(f"BENCH {metric} value={value:.3f} unit={unit} baseline={base:.3f} "
              f"ratio={ratio:.3f} better={better}")
        self.figures.append({"metric": metric, "value": value, "unit": unit, "baseline": base,
                             "baseline_name": base_name, "ratio": ratio if ratio != float("inf") else None,
                             "better": better, **({"comment": comment[2:]} if comment else {})})


def per_io(rounds, window, select, field):
    """Median over rounds of sum(field over the selected processes) / ios."""
    values = []
    for m in rounds:
        procs = [p for name, p in m[window].items() if select(name, p)]
        if m["fio"]["ios"] and procs:
            values.append(sum(p[field] for p in procs) / m["fio"]["ios"])
    return median(values)


def per_host_byte(rounds, field, source):
    values = []
    for m in rounds:
        host = m["fio"]["host_bytes"]
        if not host:
            continue
        if source == "disk":
            if m["disk"] is None:
                continue
            values.append(m["disk"][field] / host)
        else:
            values.append(sum(p[field] for p in m["flushed"].values()) / host)
    return median(values)


GOALS = {
    ("cpu", "w32", "unit_us_per_io"): "# goal (issue 12): ratio <= 2.0 (unit CPU per 4 KiB write, whole volume, vs qemu-nbd)",
    ("cpu", "r32", "unit_us_per_io"): "# goal (issue 12): ratio <= 1.5 (unit CPU per 4 KiB read of flushed data, vs qemu-nbd)",
    ("cpu", "w32", "iops"): "# goal (issues 12, 13): ratio >= 0.75",
    ("cpu", "r32", "iops"): "# goal (issues 12, 13): ratio >= 0.9",
    ("cpu", "sw", "throughput"): "# goal (issue 13): ratio >= 0.6",
    ("cpu", "sr", "throughput"): "# goal (issue 13): ratio >= 0.8",
    ("cpu", "w1", "p50_us"): "# goal (issue 12): ratio <= 1.5 (write + flush p50 vs qemu-nbd's)",
    ("disk", "w32", "write"): "# bound (issue 13): <= 3.8 disk bytes written per host byte for 4 KiB random writes (2 logs + parity 3.5; baseline is qemu-nbd's)",
    ("disk", "sw", "write"): "# bound (issue 13): <= 1.7 disk bytes written per host byte for 1 MiB sequential writes (baseline is qemu-nbd's)",
}


def phase(rep, work, rounds, prefix, ours, base, base_name, jobs, per_process_jobs):
    detail = {}
    for job in jobs:
        stem, direction, tput = JOBS[job]
        o, b = measure(work, ours, job, rounds), measure(work, base, job, rounds)
        if not o or not b:
            print(f"# {prefix}.{stem}: not measured")
            continue
        detail[job] = {"ours": o, "baseline": b}
        m = f"{prefix}.{stem}"
        if tput == "iops":
            rep.line(f"{m}.iops", median(x["fio"]["iops"] for x in o), "iops",
                     median(x["fio"]["iops"] for x in b), "higher", GOALS.get((prefix, job, "iops")), base_name)
        else:
            rep.line(f"{m}.mb_per_s", median(x["fio"]["mb_per_s"] for x in o), "MB/s",
                     median(x["fio"]["mb_per_s"] for x in b), "higher", GOALS.get((prefix, job, "throughput")), base_name)
        if job == "w1":
            for p in ("p50_us", "p99_us"):
                rep.line(f"{m}.{p}", median(x["fio"].get(p) for x in o), "us",
                         median(x["fio"].get(p) for x in b), "lower", GOALS.get((prefix, job, p)), base_name)
        every = lambda name, p: True
        base_cpu = per_io(b, "job", every, "cpu_us")
        base_ctx = per_io(b, "job", every, "ctxsw")
        rep.line(f"{m}.unit_us_per_io", per_io(o, "job", every, "cpu_us"), "us", base_cpu, "lower",
                 GOALS.get((prefix, job, "unit_us_per_io")), base_name)
        if direction == "write":
            rep.line(f"{m}.unit_with_flush_us_per_io", per_io(o, "flushed", every, "cpu_us"), "us",
                     per_io(b, "flushed", every, "cpu_us"), "lower", None, base_name)
        rep.line(f"{m}.unit_ctxsw_per_io", per_io(o, "job", every, "ctxsw"), "switches", base_ctx, "lower",
                 None, base_name)
        for role in ROLES:
            of_role = lambda name, p, role=role: p["role"] == role
            rep.line(f"{m}.{role}_us_per_io", per_io(o, "job", of_role, "cpu_us"), "us", base_cpu, "lower",
                     None, base_name)
            rep.line(f"{m}.{role}_ctxsw_per_io", per_io(o, "job", of_role, "ctxsw"), "switches", base_ctx,
                     "lower", None, base_name)
        if job in per_process_jobs:
            names = sorted({n for x in o for n in x["job"]}, key=lambda n: (ROLES.index(o[0]["job"][n]["role"])
                                                                          if o[0]["job"].get(n, {}).get("role") in ROLES else 9, n))
            for name in names:
                this = lambda n, p, name=name: n == name
                rep.line(f"{m}.proc.{name}_us_per_io", per_io(o, "job", this, "cpu_us"), "us", base_cpu,
                         "lower", None, base_name)
                rep.line(f"{m}.proc.{name}_ctxsw_per_io", per_io(o, "job", this, "ctxsw"), "switches",
                         base_ctx, "lower", None, base_name)
    return detail


def disk_phase(rep, work, rounds, ours, base, base_name):
    for job in ("w32", "r32", "sw", "sr"):
        stem, direction, _ = JOBS[job]
        o, b = measure(work, ours, job, rounds), measure(work, base, job, rounds)
        if not o or not b:
            continue
        if all(x["disk"] is None for x in o):
            print(f"# disk.{stem}: no block device under the data directory")
        for field, word in (("write_bytes", "write"), ("read_bytes", "read")):
            comment = GOALS.get(("disk", job, word))
            rep.line(f"disk.{stem}.{word}_bytes_per_host_byte", per_host_byte(o, field, "disk"), "ratio",
                     per_host_byte(b, field, "disk"), "lower", comment, base_name)
            rep.line(f"procio.{stem}.{word}_bytes_per_host_byte", per_host_byte(o, field, "procio"), "ratio",
                     per_host_byte(b, field, "procio"), "lower", comment, base_name)


def idle(rep, work, ours, base, base_name):
    """CPU (% of one core) and context switches per second with no I/O."""
    figures = {}
    for target in (ours, base):
        try:
            a, b = (load(f"{work}/snap/{target}-idle-{s}.json") for s in "ab")
        except OSError:
            return
        seconds = b["time"] - a["time"]
        deltas = proc_deltas(a, b, target, {})
        figures[target] = {role: (sum(p["cpu_us"] for p in deltas.values() if role in (None, p["role"])) / 1e4 / seconds,
                                  sum(p["ctxsw"] for p in deltas.values() if role in (None, p["role"])) / seconds)
                           for role in [None] + ROLES}
    print("# idle: no I/O; the per-I/O figures above include this background, spread over the job's I/Os")
    for role in [None] + ROLES:
        name = "unit" if role is None else role
        rep.line(f"cpu.idle.{name}_cpu_percent", figures[ours][role][0], "%", figures[base][None][0], "lower",
                 None, base_name)
        rep.line(f"cpu.idle.{name}_ctxsw_per_s", figures[ours][role][1], "switches/s", figures[base][None][1],
                 "lower", None, base_name)


def main(argv):
    work, out_json, rounds, seconds, commit, fs = argv
    rounds = int(rounds)
    rep = Report()
    print("# cpu.*: per I/O, utime+stime (/proc/<pid>/stat) and context switches (/proc/<pid>/task/*/status)")
    print("# of every process of the target, during the job (with_flush: until POST /flush returned; clock ticks")
    print("# of 10 ms, so a process's figure is good to ~1 us per I/O at 10K I/Os);")
    print(f"# baseline qemu-nbd --cache=none -f raw, same disk, same run, interleaved; median of {rounds} rounds of {seconds} s")
    detail = {"disk_unit": phase(rep, work, rounds, "cpu", "ours", "qemu", "qemu-nbd",
                                 ["w32", "r32", "w32p", "r32p", "w1", "sw", "sr"], {"w32", "r32"})}
    idle(rep, work, "ours", "qemu", "qemu-nbd")
    print("# disk.*: bytes from /proc/diskstats of the device under the data directory, from before the job to after")
    print("# the flush and sync -f: every tenant of the disk is in it (on a shared machine, others' builds);")
    print("# procio.*: the same window from /proc/<pid>/io of the target's processes only (the figure to trust when")
    print("# the disk is shared). Per host byte (fio's bytes); baseline qemu-nbd's in the same run")
    disk_phase(rep, work, rounds, "ours", "qemu", "qemu-nbd")
    print("# mem.*: a unit with its devices and logs on tmpfs (/dev/shm) against nbdkit memory, same run, interleaved")
    detail["memory_unit"] = phase(rep, work, rounds, "mem", "mem", "nbdkit", "nbdkit memory", ["w32", "r32"],
                                  {"w32", "r32"})
    json.dump({"script": "cpu.sh", "commit": commit, "nproc": os.cpu_count(),
               "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "fs": fs,
               "seconds": int(seconds), "rounds": rounds, "figures": rep.figures, "rounds_detail": detail},
              open(out_json, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
