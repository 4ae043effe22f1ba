# Logging writer over NBD for tests/it/snapshot.rs (libnbd's python
# binding): QD asynchronous 4 KiB writes to random blocks of a set, never
# two in flight to the same block (so the writes of a block are ordered);
# each block written is stamped with the write's id; every acknowledged
# write is logged as "id block issue_ns ack_ns" (CLOCK_MONOTONIC: the
# test's clock too), issue_ns taken before the write is sent and ack_ns
# after its reply arrived (so "acked before issued" in the log holds for
# the real events as well). Issues writes for SECONDS, then waits for
# every write; exits 1 if any failed.
#
# usage: snapshot_writer.py URI BLOCK,BLOCK,... QD SECONDS SEED LOG
import nbd, random, struct, sys, time

uri, blocks_arg, qd, seconds, seed, log_path = sys.argv[1:7]
qd, seconds = int(qd), float(seconds)
blocks = [int(b) for b in blocks_arg.split(",")]
rng = random.Random(int(seed))
h = nbd.NBD()
h.connect_uri(uri)
MAGIC = b"RBLOGW01"
busy = set()
log = []
failures = []
next_id = 1
inflight = 0
end = time.monotonic() + seconds

def stamp(wid, block):
    head = MAGIC + struct.pack("<QQ", wid, block)
    body = struct.pack("<Q", wid) * ((4096 - len(head)) // 8)
    return head + body

while True:
    now = time.monotonic()
    while now < end and inflight < qd and len(busy) < len(blocks):
        block = rng.choice(blocks)
        if block in busy:
            continue
        wid = next_id
        next_id += 1
        busy.add(block)
        buf = nbd.Buffer.from_bytearray(stamp(wid, block))
        issue = time.monotonic_ns()
        def done(err, wid=wid, block=block, issue=issue, buf=buf):
            global inflight
            ack = time.monotonic_ns()
            code = err[0] if isinstance(err, list) else getattr(err, "value", err)
            if code:
                failures.append((wid, block, code))
            else:
                log.append((wid, block, issue, ack))
            busy.discard(block)
            inflight -= 1
            return 1
        h.aio_pwrite(buf, block * 4096, completion=done)
        inflight += 1
    if inflight == 0 and time.monotonic() >= end:
        break
    h.poll(100)
h.shutdown()
with open(log_path, "w") as f:
    for wid, block, issue, ack in log:
        f.write(f"{wid} {block} {issue} {ack}\n")
print(f"writes {len(log)} failed {len(failures)}", file=sys.stderr)
sys.exit(1 if failures else 0)
