"""The regime a model runs in, the same for `profile`'s timings and the live engines' serving.

A profile prices the engine it was measured in: torch's thread count, the allocator, the
garbage collector and the attention kernels all move a pass's time by more than the accuracy
asked of the simulator, so `profile`, `validate` and the live engines set them alike here.
"""

from __future__ import annotations

import gc
import resource
from contextlib import contextmanager

import torch

from sim import memory

COMPILED_GRAPHS = 128  # graphs dynamo may compile per function in a -compiled mode (compile_model)


def reuse_cpu_memory() -> None:
    """Make glibc serve every block from its heap and keep freed ones for reuse, never mapping or
    unmapping memory per allocation.

    On the CPU, torch allocates through malloc. A KV cache that grows every step keeps asking for
    blocks larger than any freed so far, and glibc serves each with a fresh mmap: page faults
    and zeroing that double a decode step's time in a live engine but vanish in a benchmark
    repeating one shape. Pinning the mmap threshold at its 32 MB maximum was not enough: a
    bigger block (one layer's padded cache of 16 rows x 2,048 tokens of gpt2-tiny is 34 MB) was
    still mapped fresh, unless an earlier pass had left a free stretch of heap large enough,
    so the same decode of 16 rows over 4,096 tokens cost 80 or 300 ms by allocator history
    (calibration/validation/NOTES.md, "Blocks over 32 MB"). With mmap off (M_MMAP_MAX = 0) and
    trimming off (M_TRIM_THRESHOLD = -1: a cap of 1 GB gave a padded cache of 1 GB, freed at the
    top of the heap, back to the kernel, and its next pass paid the faults again), every block is
    reused, the steady state of a caching allocator such as CUDA's, so the profile measures what
    serving pays.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, -1)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: nothing to tune


@contextmanager
def allocations_fail_past_memory(device: torch.device):
    """On a CPU, cap the address space for the duration at what the process holds plus the memory
    available, so that a pass too big for the machine fails with torch's "can't allocate memory"
    (its grid point is then left out, as a GPU's out-of-memory is: measure.is_oom) instead of the
    kernel killing the process. Linux overcommits: a 256-row prefill of 4,096 tokens asked for
    68 GB of attention scores on a 23 GB host, and the kernel killed `validate` mid-sweep with
    no word of why. Only for the duration: a browser or a compiler started later reserves far
    more address space than it uses."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    soft, hard = before
    cap = _address_space_cap() if device.type == "cpu" else None  # a GPU's own allocator raises its OOM
    if cap is not None and hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if cap is not None and (soft == resource.RLIM_INFINITY or cap < soft):
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)


def _address_space_cap() -> int | None:
    """Bytes of address space this process holds plus the memory available (None off Linux)."""
    available, held = available_memory(torch.device("cpu")), memory.proc_bytes("/proc/self/status", "VmSize")
    return None if available is None or held is None else available + held


def available_memory(device: torch.device) -> int | None:
    """Bytes `device` can still give: a GPU's free memory, a CPU's MemAvailable (None off Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return memory.available()


def freeze_heap() -> None:
    """Take everything alive now, once the model is built, out of the garbage collector's sight,
    as serving engines do after their warm-up (vLLM's `freeze_gc_heap`, SGLang's `freeze_gc`).

    Otherwise every full collection walks the heap torch and transformers leave behind (374,000
    objects with llama-tiny built: 164 ms a collection on this project's CPU) and lands, as a
    stall, inside whatever runs when it starts: a validation caught one of 189 ms inside a
    calibration flood, whose steps set the engine overhead, and a live decode step priced at
    3.9 ms took 208 ms, a collection's length, paid by every request in the batch and behind it.
    Frozen, a full collection walks only what was allocated since: milliseconds at most."""
    gc.collect()
    gc.freeze()


def serving_regime(device: torch.device, threads: int) -> None:
    """Put this process in the regime `profile` measures in and the live engines run in: torch's
    thread count (a profile prices the engine at the count it was measured with), on a CPU an
    allocator that keeps freed buffers (reuse_cpu_memory), on a GPU attention kernels that cost
    the same every call (keep_attention_steady). Once the model is built, the caller freezes
    the heap (freeze_heap)."""
    torch.set_num_threads(threads)
    if device.type == "cpu":
        reuse_cpu_memory()
    else:
        keep_attention_steady()


def keep_attention_steady() -> None:
    """Take cuDNN out of torch's attention (SDPA) backends, leaving flash and memory-efficient
    attention, the kernels serving engines run.

    On Hopper and newer cards recent torch tries cuDNN first for fp16/bf16 attention, and cuDNN
    builds an execution plan for every shape it has not run (batch, query and key lengths)
    before running it: a one-off cost of tens of milliseconds that a serving loop pays again and
    again, its cache growing a token a step, and that a grid pays or not by what ran before it.
    The H100 records bear its signature (calibration/validation/NOTES.md, "H100: an attention
    plan per shape"): gpt2's fp16 and bf16 prefills took 48-88 ms at every point from 1 x 128
    tokens to 32 x 512, where fp32, which cuDNN does not run, took 11.3 to 92.9 ms, and its
    bf16 decodes split between a fastest tenth of 5-19 ms and a slowest of 45-100 ms."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def compile_model(model):
    """The model under torch.compile, as the `-compiled` modes time it and serve it.

    Each call signature the grid and the serving loop use (prefill or decode, one row or many,
    with or without a padding mask) is a graph of its own, and past torch's default of 8 graphs
    per function dynamo silently runs the rest eagerly: a quick CPU grid hit that limit, so a
    "compiled" profile timed mostly eager passes. So allow more graphs than any grid needs, and
    make hitting the limit an error rather than a quiet fallback."""
    torch._dynamo.config.recompile_limit = COMPILED_GRAPHS
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(model, dynamic=True)
