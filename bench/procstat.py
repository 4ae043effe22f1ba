#!/usr/bin/env python3
"""Process and disk counters for the benches (bench/cpu.sh).

    procstat.py snap PIDS OUT [DATA_DIR]
    procstat.py watch PIDS OUT TARGET MAX_SECONDS
    procstat.py device DATA_DIR

`snap` writes one JSON snapshot of every process listed in PIDS (lines
`<target> <role> <name> <pid>`) and of the block device under DATA_DIR:

- CPU: utime + stime from /proc/<pid>/stat (fields 14 and 15, clock ticks;
  the kernel sums every thread of the process, dead threads included).
- Context switches: voluntary + nonvoluntary from
  /proc/<pid>/task/<tid>/status, per thread. /proc/<pid>/status counts the
  main thread only, so the per-thread figures are kept by tid: a delta sums
  the threads present in both snapshots and counts a thread born in between
  from zero. A thread that ends in between would be lost (nbdkit's and
  qemu-nbd's workers end with the client's connection), so `watch` samples
  the threads of TARGET's processes every 0.2 s during a job, until SIGTERM
  or MAX_SECONDS, and writes the highest count seen per thread; the report
  takes the highest of the watch and the snapshot.
- Block I/O per process: read_bytes and write_bytes from /proc/<pid>/io
  (what the process sent to the block layer, direct I/O and io_uring
  included); unlike /proc/diskstats these ignore other tenants of the disk.
- The device: sectors read and written from /proc/diskstats for the device
  (partition or whole disk) that holds DATA_DIR, found by its st_dev, or by
  `findmnt` when the file system reports an anonymous device (overlay, btrfs
  subvolumes). tmpfs has none: the figures are then absent.

`device` prints the diskstats name of DATA_DIR's device, or nothing.

A process that exited reads as absent; the report then leaves it out.
"""

import json
import os
import signal
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_ticks(pid):
    text = read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after
    # the last ')'. Then field 3 is at index 0, utime (14) at 11, stime at 12.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def thread_switches(pid):
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        text = read(f"/proc/{pid}/task/{tid}/status")
        if text is None:
            continue
        count = 0
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                count += int(line.split()[1])
        out[tid] = count
    return out


def block_io(pid):
    text = read(f"/proc/{pid}/io")
    if text is None:
        return None
    fields = dict(line.split(": ") for line in text.splitlines() if ": " in line)
    return {"read_bytes": int(fields["read_bytes"]), "write_bytes": int(fields["write_bytes"])}


def device_numbers(data_dir):
    """(major, minor) of the block device holding data_dir, or None."""
    dev = os.stat(data_dir).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major != 0:
        return major, minor
    try:
        source = subprocess.run(["findmnt", "-no", "SOURCE", "--target", data_dir],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        # A file system mounted twice is listed twice.
        source = source.splitlines()[0] if source else ""
        # btrfs shows /dev/sda2[/subvolume]
        source = source.split("[")[0]
        if source.startswith("/dev/"):
            rdev = os.stat(source).st_rdev
            return os.major(rdev), os.minor(rdev)
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def diskstats(numbers):
    if numbers is None:
        return None
    for line in (read("/proc/diskstats") or "").splitlines():
        f = line.split()
        if len(f) >= 10 and (int(f[0]), int(f[1])) == numbers:
            # 512-byte sectors, whatever the device's block size.
            return {"name": f[2], "read_bytes": int(f[5]) * 512, "write_bytes": int(f[9]) * 512}
    return None


def snap(pids_file, out, data_dir):
    procs = []
    with open(pids_file) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            target, role, name, pid = line.split()
            ticks = cpu_ticks(pid)
            if ticks is None:
                continue
            procs.append({"target": target, "role": role, "name": name, "pid": int(pid),
                          "cpu_us": ticks * 1e6 / TICKS, "threads": thread_switches(pid),
                          "io": block_io(pid)})
    disk = diskstats(device_numbers(data_dir)) if data_dir else None
    with open(out, "w") as f:
        json.dump({"time": time.time(), "procs": procs, "disk": disk}, f)


def watch(pids_file, out, target, max_seconds):
    procs = []
    with open(pids_file) as f:
        for line in f:
            fields = line.split()
            if len(fields) == 4 and fields[0] == target and cpu_ticks(fields[3]) is not None:
                procs.append((fields[2], fields[3]))
    seen = {f"{name}:{pid}": {} for name, pid in procs}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    deadline = time.monotonic() + max_seconds
    while not stop and time.monotonic() < deadline:
        for name, pid in procs:
            mine = seen[f"{name}:{pid}"]
            for tid, count in thread_switches(pid).items():
                mine[tid] = max(mine.get(tid, 0), count)
        time.sleep(0.2)
    with open(out, "w") as f:
        json.dump(seen, f)


def main(argv):
    if len(argv) >= 3 and argv[0] == "snap":
        snap(argv[1], argv[2], argv[3] if len(argv) > 3 else None)
    elif len(argv) == 5 and argv[0] == "watch":
        watch(argv[1], argv[2], argv[3], float(argv[4]))
    elif len(argv) == 2 and argv[0] == "device":
        stats = diskstats(device_numbers(argv[1]))
        print(stats["name"] if stats else "")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
