"""The live engine: a scenario's requests through the real model, on the wall clock.

It drives the very scheduler objects the simulator drives (sim.scheduler), so a validation
compares the cost model with reality and not two implementations of batching. Each Step the
scheduler forms is executed as real forward passes of a transformers model:

- one padded KV cache for the batch (left padding, as HF `generate` and TGI v1 keep it);
- a prefill step pads its prompts to the longest and runs them as one batch with logits for the
  last position only; its new rows join the running cache between steps (continuous batching)
  or start a new one (static and dynamic batching);
- a decode step feeds one token per row; rows leave the cache when their request finishes,
  except in a static or dynamic batch, whose finished rows are computed until the batch ends.

Output lengths are forced (no EOS): token ids are random, as the weights are, since neither
changes what a pass costs. Requests arrive by the trace's times on the wall clock.

Each step's time inside the model and around it is recorded: what the serving loop spends
outside the model (scheduling, cache copies and bookkeeping, preparing inputs) is a cost of its
own, which `profile` measures here and the simulator adds to every step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from profiler.models import max_positions
from sim.request import Request
from sim.scheduler import ContinuousScheduler, Step
from sim.simulator import Outcome
from sim.workload import Trace


@dataclass
class Batch:
    """The KV cache of the requests now in a forward pass, one row each, left-padded."""

    rows: list[Request]
    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # (rows, cache length): 1 for a real token, 0 for padding


class LiveEngine:
    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        self.vocab = model.config.vocab_size
        self.batch: Batch | None = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _ids(self, b: int, n: int) -> torch.Tensor:
        return torch.randint(0, self.vocab, (b, n), device=self.device)

    def warm_up(self) -> None:
        window = max_positions(self.model)
        with torch.inference_mode():
            for b, n in ((1, 16), (2, 64), (4, 128)):
                n = min(n, window - 1)  # and a decode after it: a model of 128 positions has no 129th
                out = self.model(input_ids=self._ids(b, n), use_cache=True, logits_to_keep=1)
                self.model(input_ids=self._ids(b, 1), cache=out.cache, use_cache=True)
        self.sync()

    def run_step(self, step) -> float:
        """Execute one scheduler Step as a real forward pass; returns the seconds inside the model."""
        with torch.inference_mode():
            if step.prefill:
                seconds = self._prefill([r for r, _ in step.prefill], [c for _, c in step.prefill])
            else:
                seconds = self._decode()
        self.sync()
        return seconds

    def _forward(self, **inputs) -> tuple[object, float]:
        """The model's output and the seconds it took (device synchronised)."""
        start = time.perf_counter()
        out = self.model(**inputs)
        self.sync()
        return out, time.perf_counter() - start

    def _prefill(self, reqs: list[Request], lengths: list[int]) -> float:
        longest = max(lengths)
        ids = self._ids(len(reqs), longest)
        mask = torch.zeros(len(reqs), longest, dtype=torch.long, device=self.device)
        for i, n in enumerate(lengths):
            mask[i, longest - n:] = 1
        padded = bool((mask == 0).any())
        out, seconds = self._forward(input_ids=ids, attention_mask=mask if padded else None, use_cache=True,
                                     logits_to_keep=1)
        new = Batch(reqs, out.cache, mask)
        self.batch = new if self.batch is None else _concatenate(self.batch, new)
        return seconds

    def _decode(self) -> float:
        batch = self.batch
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        padded = bool((batch.mask == 0).any())
        _, seconds = self._forward(input_ids=self._ids(len(batch.rows), 1),
                                   attention_mask=batch.mask if padded else None,
                                   cache=batch.cache, use_cache=True)
        return seconds

    @torch.inference_mode()  # the cache stays inference tensors, as the passes made it (Bench._ids)
    def keep(self, running: set[int]) -> None:
        """Drop the rows of requests that left the batch, and padding no row needs any more."""
        batch = self.batch
        if batch is None:
            return
        keep = [i for i, r in enumerate(batch.rows) if r.id in running]
        if not keep:
            self.batch = None
            return
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, device=self.device)
            batch.rows = [batch.rows[i] for i in keep]
            batch.mask = batch.mask.index_select(0, index)
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        used = int(batch.mask.sum(dim=1).max())
        trim = batch.mask.shape[1] - used
        if trim > 0:  # every row has at least `trim` columns of left padding
            batch.mask = batch.mask[:, trim:]
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]


def _concatenate(a: Batch, b: Batch) -> Batch:
    """One batch of both, the shorter left-padded to the longer (TGI v1's Batch.concatenate)."""
    length = max(a.mask.shape[1], b.mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)], dim=0)
        la.values = torch.cat([pad(la.values, 2), pad(lb.values, 2)], dim=0)
    return Batch(a.rows + b.rows, a.cache, torch.cat([pad(a.mask, 1), pad(b.mask, 1)], dim=0))


def running_ids(scheduler) -> set[int]:
    """Requests whose rows stay in the batch: a padded batch keeps every row until it ends."""
    if hasattr(scheduler, "running"):
        return set(scheduler.running)
    return {r.id for r in scheduler.batch}


@dataclass
class LiveRun:
    outcome: Outcome
    steps: list[Step]  # every step the scheduler formed, in order
    started_s: np.ndarray  # per step: when its forward pass began, seconds from the run's start
    loop_s: np.ndarray  # per step: the serving loop's seconds, from scheduling to cache cleanup
    forward_s: np.ndarray  # per step: seconds inside the model's forward passes
    idle_s: np.ndarray  # per step: seconds the engine waited for work before it (inf for the first)


def run_live(engine: LiveEngine, scheduler, trace: Trace) -> LiveRun:
    """Release the trace's requests on the wall clock through `scheduler`, running every step
    on the engine. Times are in seconds from the first arrival's release."""
    n = len(trace)
    outcome = Outcome.empty(n)
    times = trace.arrived_at.tolist()
    prompt, output = trace.prompt_tokens.tolist(), trace.output_tokens.tolist()
    done = released = 0
    steps, started_s, loop_s, forward_s, idle_s = [], [], [], [], []
    engine.batch = None
    last_end = -math.inf
    waited = True  # before its first step the engine had no work
    start = time.perf_counter()

    def record(r: Request) -> None:
        nonlocal done
        outcome.record(r, r.worker)  # one worker: its replica is 0 too
        done += 1

    while done < n:
        top = time.perf_counter()
        now = top - start
        while released < n and times[released] <= now:
            req = Request(released, times[released], prompt[released], output[released])
            if scheduler.add(req):
                req.worker = 0
            else:
                record(req)
            released += 1
        if released == n:
            scheduler.close()
        step = scheduler.schedule(now)
        if step is None:
            if done == n:  # the last arrivals were turned away (too long for the cache or the window)
                break
            wake = min(times[released] if released < n else math.inf, scheduler.wake_at)
            assert wake < math.inf, "scheduler idle with requests outstanding"
            time.sleep(max(wake - (time.perf_counter() - start), 0.0))
            waited = True
            continue
        # Rows of requests that left go now, not at the end of the step they finished in: the
        # scheduler charges that copy to this step (Step.reshuffle_tokens), and so does loop_s.
        engine.keep(running_ids(scheduler))
        steps.append(step)
        begin = time.perf_counter()
        started_s.append(begin - start)
        # The device sat idle only if the loop waited: between steps run straight on, the host's
        # own work (scheduling, cache copies) is the engine overhead, not a gap that wakes the
        # device, as the simulator prices it.
        idle_s.append(begin - last_end if waited else 0.0)
        waited = False
        forward_s.append(engine.run_step(step))
        last_end = time.perf_counter()
        for r in scheduler.postprocess(step, time.perf_counter() - start):
            record(r)
        loop_s.append(time.perf_counter() - top)
    engine.keep(running_ids(scheduler))  # the last rows leave with the run
    return LiveRun(outcome, steps, np.array(started_s), np.array(loop_s), np.array(forward_s), np.array(idle_s))


def calibration_flood(engine: LiveEngine) -> LiveRun:
    """A flood of 8 short requests, all arriving at once, through continuous batching: the serving
    loop kept busy. Its steps show what the loop costs outside the model (EngineOverhead)."""
    rng = np.random.default_rng(0)
    requests = 8
    longest = min(128, max_positions(engine.model) - 32)  # a prompt and 31 tokens after it fit the window
    trace = Trace(np.zeros(requests), rng.integers(16, longest, requests), rng.integers(8, 32, requests))
    room = float(trace.prompt_tokens.sum() + trace.output_tokens.sum())  # every request fits at once
    scheduler = ContinuousScheduler(max_num_seqs=8, max_batched_tokens=1024, kv_capacity=room, padded=True)
    return run_live(engine, scheduler, trace)


def build_for_profile(profile, mode_name: str, device: torch.device, quiet: bool = False):
    """The profile's model, in the profile's mode, on `device` (`quiet`: as `build`)."""
    from profiler.measure import DTYPES
    from profiler.regime import compile_model
    from profiler.models import build, check_fits, lookup

    mode, spec = profile.modes[mode_name], lookup(profile.model_name)
    check_fits(spec, DTYPES[mode.dtype], device)
    model = build(spec, DTYPES[mode.dtype], device, quiet)
    return compile_model(model) if mode.compiled else model

