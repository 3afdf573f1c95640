"""The memory a run can still take. Linux overcommits: a run that outgrows the machine is not
refused an allocation but killed by the kernel, with no word of why (exit 137), so as its
requests arrive a run checks that what its results will still need is free."""

from __future__ import annotations

# What a run allocates once its requests have arrived, per request: its table's own columns (48
# bytes) and the transients of building them (tests/test_invariants.py traces 156 bytes a request
# at the table's peak, against 58 before it), then its report's reading back the columns it draws
# (48) and drawing them: `simulate` of 1,000,000 requests grew by 200 MB after its simulation. And
# for the CSV writers and plotly.js, a reserve.
RESULT_BYTES = 200
RESERVE_BYTES = 64 * 2**20


def available() -> int | None:
    """Bytes the machine can still give (Linux's MemAvailable; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def check(requests: int, arrived: int) -> None:
    """Raise MemoryError (a command's one line) where the machine no longer has what the run's
    results need: at its start, or once a queue of requests it cannot serve has taken the rest.
    Queued, a request holds about 260 bytes more: 3,000,000 at one replica peaked at 1.3 GB."""
    free, need = available(), requests * RESULT_BYTES + RESERVE_BYTES
    if free is not None and free < need:
        raise MemoryError(f"{free / 2**20:,.0f} MB free after {arrived:,} of {requests:,} requests arrived, "
                          f"where their results need {need / 2**20:,.0f} MB")
