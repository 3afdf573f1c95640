"""transformers' own continuous-batching engine, driven on the wall clock and timed step by step.

servesim's live engine runs the simulator's own scheduler objects, so validating against it
measures the cost model alone. This is the stronger test: an engine nobody here wrote
(`model.init_continuous_batching()`: a FIFO scheduler over a token budget, chunked prefill, a
paged KV cache, every step one ragged forward pass of all its requests' tokens), whose latencies
the simulator must predict from a description of its batching and a model of its step times.

Each step is recorded by wrapping the model's forward (what it computed: query tokens, the KV
tokens they attend over, requests) and the engine's loop body (its seconds, scheduling and
bookkeeping included). Requests are released by the trace's times; output lengths are forced
(no EOS token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sim.simulator import Outcome
from sim.workload import Trace


@dataclass(frozen=True)
class EngineConfig:
    """The engine's batching limits, fixed so the simulator can be told the same ones."""

    max_batch_tokens: int = 256  # query tokens per step: decodes first, then prompt chunks
    max_requests: int = 32  # requests per step
    num_blocks: int = 256
    page_size: int = 64  # cache capacity = num_blocks x page_size tokens


@dataclass
class EngineSteps:
    """Every forward pass of a run: its shape and its seconds."""

    q_tokens: np.ndarray  # tokens computed
    kv_tokens: np.ndarray  # tokens attended over, summed over the step's requests (this step's included)
    rows: np.ndarray  # requests in the step
    step_s: np.ndarray  # the engine loop's whole step: schedule, prepare inputs, forward, sample, update


@dataclass
class EngineRun:
    outcome: Outcome
    steps: EngineSteps


class HFEngine:
    def __init__(self, model, config: EngineConfig):
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.config = config
        self.vocab = model.config.vocab_size
        self.rng = np.random.default_rng(0)
        # eos -1: no token ends a request early, every request runs to its max_new_tokens.
        generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=1)
        cb = ContinuousBatchingConfig(max_batch_tokens=config.max_batch_tokens, num_blocks=config.num_blocks,
                                      page_size=config.page_size, max_requests_per_batch=config.max_requests,
                                      allow_block_sharing=False)  # no prefix cache: prompts are random anyway
        self._shapes: list[tuple[int, int, int]] = []
        self._seconds: list[float] = []
        forward = model.forward

        def timed_forward(*args, **kwargs):
            rows = int(kwargs["cu_seq_lens_q"].numel() - 1)  # one ragged sequence per request
            kv = int(next(iter(kwargs["cu_seq_lens_k"].values()))[-1])
            self._shapes.append((int(kwargs["input_ids"].shape[1]), kv, rows))
            return forward(*args, **kwargs)

        model.forward = timed_forward
        with torch.no_grad():
            self.manager = model.init_continuous_batching(generation_config=generation,
                                                          continuous_batching_config=cb)
        body = self.manager._generation_loop_body

        def timed_body(*args, **kwargs):
            before, t0 = len(self._shapes), time.perf_counter()
            going = body(*args, **kwargs)
            if len(self._shapes) > before:  # a step ran (otherwise the loop waited for requests)
                self._seconds.append(time.perf_counter() - t0)
            return going

        self.manager._generation_loop_body = timed_body  # the background thread's loop calls it per step
        self.manager.start()

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=10)

    def run(self, trace: Trace) -> EngineRun:
        """Release the trace's requests on the wall clock; times in seconds from the first release."""
        n = len(trace)
        prompts = [self.rng.integers(1, self.vocab, int(p)).tolist() for p in trace.prompt_tokens]
        self._shapes.clear()
        self._seconds.clear()
        start = time.perf_counter()
        for i, (at, prompt, out) in enumerate(zip(trace.arrived_at.tolist(), prompts, trace.output_tokens.tolist())):
            time.sleep(max(at - (time.perf_counter() - start), 0.0))
            self.manager.add_request(prompt, request_id=str(i), max_new_tokens=int(out), record_timestamps=True)
        outcome = Outcome.empty(n)
        done = 0
        while done < n:
            result = self.manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("transformers' engine returned no result within 10 minutes")
            if not result.is_finished():
                continue
            done += 1
            i = int(result.request_id)
            outcome.scheduled_at[i] = result.lifespan[0] - start
            outcome.first_token_at[i] = result.timestamps[0] - start
            outcome.finished_at[i] = result.timestamps[-1] - start
        outcome.worker[:] = outcome.replica[:] = 0
        while len(self._seconds) < len(self._shapes):  # the last step's loop body is still returning
            time.sleep(0.001)
        shapes = np.array(self._shapes, dtype=float).reshape(-1, 3)
        return EngineRun(outcome, EngineSteps(shapes[:, 0], shapes[:, 1], shapes[:, 2],
                                              np.array(self._seconds[:len(shapes)])))
