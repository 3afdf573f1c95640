"""The memory a run can still take. Linux overcommits: a run that outgrows the machine, or its
container's memory limit, is not refused an allocation but killed by the kernel, with no word of
why (exit 137), so as its requests arrive a run checks that what its results will still need is
free."""

from __future__ import annotations

from pathlib import Path

# What a run allocates once its requests have arrived, per request: its table's own columns (48
# bytes) and the transients of building them (tests/test_invariants.py traces 156 bytes a request
# at the table's peak, against 58 before it), then its report's reading back the columns it draws
# (48) and drawing them: `simulate` of 1,000,000 requests grew by 200 MB after its simulation. And
# for the CSV writers and plotly.js, a reserve.
RESULT_BYTES = 200
# Per time-series sample, once taken (its 7 columns, 56 bytes, are held during the run): its frame's
# columns, then the CSV writer's and the report's reading back (it draws 4,000 points at most). A
# run's peak grew by 148 bytes a sample from 426,000 samples to 852,000, 59 of them held in the run.
SAMPLE_BYTES = 100
RESERVE_BYTES = 64 * 2**20

# Where the kernel says which cgroups this process is in, and per cgroup version the memory
# controller's mount, its limit and usage files, and memory.stat's count of page cache it can drop.
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_FILES = {2: ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
                1: ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def proc_bytes(path: str, key: str) -> int | None:
    """A "Key:   N kB" field of a /proc file (meminfo, self/status) in bytes; None off Linux."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def available() -> int | None:
    """Bytes this process can still take: the machine's MemAvailable, or less where a cgroup it is
    in (a container's memory limit) leaves less. None where neither can be read: not Linux."""
    free = [proc_bytes("/proc/meminfo", "MemAvailable"), *_cgroup_headroom()]
    return min((b for b in free if b is not None), default=None)


def _cgroup_headroom() -> list[int]:
    """For this process's cgroups and those above them, where one has a memory limit: the limit less
    its working set (usage less the inactive page cache, which the kernel drops before it kills; the
    kubelet counts it so). A container's own cgroup is often its mount's root while the path names
    the host's: so every folder from the path up to the root is read, and one that is not there is
    passed over."""
    try:
        lines = Path(PROC_CGROUP).read_text().splitlines()
    except (OSError, ValueError):
        return []
    out = []
    for line in lines:
        fields = line.split(":", 2)  # id:controllers:path (v2's controllers empty); a path may hold colons
        if len(fields) < 3 or (fields[1] and "memory" not in fields[1].split(",")):
            continue  # another controller's, or a line the kernel does not write: a check must not fail
        _, controllers, path = fields
        mount, limit_file, usage_file, cache_key = CGROUP_FILES[1 if controllers else 2]
        folder = Path(mount + path.rstrip("/"))
        while True:
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit != "max" and int(limit) < 2**60:  # v1 writes no limit as 2^63 rounded to pages
                    stat = dict(row.split() for row in (folder / "memory.stat").read_text().splitlines())
                    usage = int((folder / usage_file).read_text()) - int(stat.get(cache_key, 0))
                    out.append(int(limit) - usage)
            except (OSError, ValueError):
                pass
            if str(folder) == mount or folder == folder.parent:
                break
            folder = folder.parent
    return out


def check(requests: int, arrived: int, samples: int) -> None:
    """Raise MemoryError (a command's one line) where the machine no longer has what the run's
    results need: at its start, or once a queue of requests it cannot serve, or a time series
    sampled too often, has taken the rest. Queued, a request holds about 260 bytes more: 3,000,000
    at one replica peaked at 1.3 GB."""
    free = available()
    need = requests * RESULT_BYTES + samples * SAMPLE_BYTES + RESERVE_BYTES
    if free is not None and free < need:
        # Name the samples where they are what is short: the remedy is then a longer interval.
        taken = (f" and {samples:,} time-series samples taken (raise output.sample_interval_s)"
                 if samples * SAMPLE_BYTES > requests * RESULT_BYTES else "")
        raise MemoryError(f"{free / 2**20:,.0f} MB free after {arrived:,} of {requests:,} requests arrived{taken}, "
                          f"where their results need {need / 2**20:,.0f} MB")
