# Logging writer over NBD for tests/it/snapshot_crash.rs (libnbd's python
# binding): QD asynchronous 4 KiB writes to random blocks of a set, on one
# volume or on several (one NBD connection each), never two in flight to
# the same block of a volume (so the writes of a block are ordered).
#
# The writes form QD dependency chains: each chain's next write is issued
# only after its previous write was acknowledged, and goes to the next
# volume in turn (volume 0, 1, ..., 0, ...; with one volume it stays
# there). So with two volumes every write but a chain's first depends on
# an acknowledged write to the other volume: a consistency group's
# snapshot holding a write must hold the one it depends on.
#
# Each block written is stamped with the write's id; every acknowledged
# write is logged as "id volume block issue_ns ack_ns dep" (CLOCK_MONOTONIC:
# the test's clock too; dep: the id of the write acknowledged before this
# one was issued, 0 for a chain's first), issue_ns taken before the write
# is sent and ack_ns after its reply arrived (so "acked before issued" in
# the log holds for the real events as well). Issues writes for SECONDS,
# then waits for every write; exits 1 if any failed.
#
# usage: snapshot_writer.py URI[,URI...] BLOCK,BLOCK,... QD SECONDS SEED LOG
import nbd, random, select, struct, sys, time

uris_arg, blocks_arg, qd, seconds, seed, log_path = sys.argv[1:7]
qd, seconds = int(qd), float(seconds)
uris = uris_arg.split(",")
blocks = [int(b) for b in blocks_arg.split(",")]
if qd >= len(blocks):
    sys.exit("QD must be below the number of blocks")
rng = random.Random(int(seed))
handles = []
for uri in uris:
    h = nbd.NBD()
    h.connect_uri(uri)
    handles.append(h)
MAGIC = b"RBLOGW01"
busy = set()
log = []
failures = []
next_id = 1
inflight = 0
# Chains ready for their next write: (volume, dep).
ready = [(i % len(uris), 0) for i in range(qd)]
end = time.monotonic() + seconds

def stamp(wid, block):
    head = MAGIC + struct.pack("<QQ", wid, block)
    body = struct.pack("<Q", wid) * ((4096 - len(head)) // 8)
    return head + body

def pump(timeout):
    """Waits up to timeout seconds for any connection, then lets libnbd
    run the replies that arrived (their completions run here)."""
    reads, writes = [], []
    for h in handles:
        direction = h.aio_get_direction()
        if direction & nbd.AIO_DIRECTION_READ:
            reads.append(h.aio_get_fd())
        if direction & nbd.AIO_DIRECTION_WRITE:
            writes.append(h.aio_get_fd())
    readable, writable, _ = select.select(reads, writes, [], timeout)
    for h in handles:
        fd = h.aio_get_fd()
        if fd in readable:
            h.aio_notify_read()
        if fd in writable:
            h.aio_notify_write()

while True:
    now = time.monotonic()
    while now < end and ready:
        volume, dep = ready.pop(0)
        free = [b for b in blocks if (volume, b) not in busy]
        block = rng.choice(free)
        wid = next_id
        next_id += 1
        busy.add((volume, block))
        buf = nbd.Buffer.from_bytearray(stamp(wid, block))
        issue = time.monotonic_ns()
        def done(err, wid=wid, volume=volume, block=block, issue=issue, dep=dep, buf=buf):
            global inflight
            ack = time.monotonic_ns()
            code = err[0] if isinstance(err, list) else getattr(err, "value", err)
            if code:
                failures.append((wid, volume, block, code))
            else:
                log.append((wid, volume, block, issue, ack, dep))
                # The chain goes on, on the next volume, depending on this.
                ready.append(((volume + 1) % len(uris), wid))
            busy.discard((volume, block))
            inflight -= 1
            return 1
        handles[volume].aio_pwrite(buf, block * 4096, completion=done)
        inflight += 1
    if inflight == 0 and time.monotonic() >= end:
        break
    pump(0.1)
for h in handles:
    h.shutdown()
with open(log_path, "w") as f:
    for wid, volume, block, issue, ack, dep in log:
        f.write(f"{wid} {volume} {block} {issue} {ack} {dep}\n")
print(f"writes {len(log)} failed {len(failures)}", file=sys.stderr)
sys.exit(1 if failures else 0)
