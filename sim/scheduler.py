"""Batching policies: which requests run in the next forward pass.

Like nano-vllm's `Scheduler`, each policy is a plain object with `add`, `schedule` and
`postprocess`. The simulator drives them with SimPy time and costs from a profile; the live
engine drives the very same objects with a real model and the wall clock, so validation measures
the cost model and not two diverging implementations.

One forward pass is a `Step`. A driver calls `schedule(now)`, runs (or prices) the step, then
calls `postprocess(step, now)` at the time the pass ends. A decode-only step whose `max_repeat`
is k can be run k times in a row with nothing changing but the contexts; the simulator uses this
to price a whole run of decode iterations as one event (`postprocess(step, now, repeat=j)`),
which is exactly equivalent to j single steps.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from sim.request import Request


@dataclass(slots=True)
class Step:
    """One forward pass, with what the cost model needs to price it."""

    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens computed)
    prefill_seqs: int = 0
    prefill_len: float = 0.0  # tokens per prefill row as priced: padded max, or mean of chunks
    decode_seqs: int = 0  # rows decoded (a padded batch still computes its finished rows)
    decode_context: int = 0  # sum over decode rows of tokens already in the KV cache
    max_repeat: int = 1  # a decode-only step may be repeated this many times unchanged
    interruptible: bool = False  # an arrival during a repeated run would change the next step
    reshuffle_tokens: int = 0  # KV tokens a padded cache copies to add or drop rows for this step


def reject_reason(req: Request, kv_capacity: float, max_context: float) -> str:
    """Why a request can never run on a worker of this KV capacity and model, or '' if it can."""
    if req.prompt_tokens + req.output_tokens > max_context:  # as vLLM checks its max_model_len
        return "exceeds_context_window"
    if req.prompt_tokens + req.output_tokens - 1 > kv_capacity:
        return "kv_cache_too_small"
    return ""


class PaddedBatchScheduler:
    """Static and dynamic batching: a batch is padded to its longest prompt and run to completion.

    Requests that arrive while a batch runs wait for the next one (HF `generate` style). A row
    whose request has finished keeps being computed until the longest request in the batch is
    done, as in a padded batch. Output is streamed: each request finishes at its own last token.

    Static batching (`max_wait_s=None`) waits for a full batch of `max_batch_size`; only when the
    workload has ended (`close()`) does it run a partial one. Dynamic batching (BentoML's
    adaptive batching) runs as soon as `max_batch_size` requests wait or the oldest has waited
    `max_wait_s`.
    """

    def __init__(self, max_batch_size: int, kv_capacity: float, max_wait_s: float | None,
                 max_context: float = math.inf):
        self.max_batch_size = max_batch_size
        self.kv_capacity = kv_capacity
        self.max_context = max_context  # the model's context window: prompt + output tokens
        self.max_wait_s = max_wait_s
        self.waiting: deque[Request] = deque()
        self.batch: list[Request] = []  # sorted by output length: finishing order
        self.next_done = 0  # index in batch of the next request to finish
        self.padded_len = 0
        self.steps_done = 0  # decode steps run by the current batch
        self.closed = False
        self.wake_at = math.inf  # when schedule() may next return a step if nothing arrives

    def add(self, req: Request) -> bool:
        req.rejected = reject_reason(req, self.kv_capacity, self.max_context)
        if req.rejected:
            return False
        self.waiting.append(req)
        return True

    def close(self) -> None:
        """No more requests will arrive: a static batcher may now run a partial batch."""
        self.closed = True

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.batch) - self.next_done

    @property
    def kv_used(self) -> int:
        return len(self.batch) * (self.padded_len + self.steps_done) if self.batch else 0

    def _ready(self, now: float) -> bool:
        if len(self.waiting) >= self.max_batch_size:
            return True
        if self.max_wait_s is None:  # static: a partial batch only once nothing more can come
            return self.closed and bool(self.waiting)
        if not self.waiting:
            self.wake_at = math.inf
            return False
        self.wake_at = self.waiting[0].arrived_at + self.max_wait_s
        return now >= self.wake_at

    def schedule(self, now: float) -> Step | None:
        if not self.batch:
            if not self._ready(now):
                return None
            self._form_batch(now)
            return Step(
                prefill=[(r, r.prompt_tokens) for r in self.batch],
                prefill_seqs=len(self.batch),
                prefill_len=self.padded_len,
            )
        b = len(self.batch)
        next_finish = self.batch[self.next_done].output_tokens - 1
        return Step(
            decode_seqs=b,
            decode_context=b * (self.padded_len + self.steps_done),
            max_repeat=next_finish - self.steps_done,
        )

    def _form_batch(self, now: float) -> None:
        # Take requests in arrival order while the padded batch still fits in the KV cache at
        # its longest: every row holds padded prompt + longest output - 1 tokens by the end.
        batch: list[Request] = []
        longest_prompt = longest_output = 0
        while self.waiting and len(batch) < self.max_batch_size:
            r = self.waiting[0]
            p, o = max(longest_prompt, r.prompt_tokens), max(longest_output, r.output_tokens)
            if batch and (len(batch) + 1) * (p + o - 1) > self.kv_capacity:
                break
            batch.append(self.waiting.popleft())
            longest_prompt, longest_output = p, o
            r.scheduled_at = now
        batch.sort(key=lambda r: r.output_tokens)
        self.batch, self.next_done = batch, 0
        self.padded_len, self.steps_done = longest_prompt, 0

    def postprocess(self, step: Step, now: float, repeat: int = 1) -> list[Request]:
        if step.prefill:
            for r, _ in step.prefill:
                r.generated = 1
                r.first_token_at = now
        else:
            self.steps_done += repeat
        finished = []
        while self.next_done < len(self.batch):
            r = self.batch[self.next_done]
            if r.output_tokens - 1 > self.steps_done:
                break
            r.generated = r.output_tokens
            r.finished_at = now
            finished.append(r)
            self.next_done += 1
        if self.next_done == len(self.batch):
            self.batch, self.next_done, self.padded_len, self.steps_done = [], 0, 0, 0
        return finished


class ContinuousScheduler:
    """Iteration-level batching (Orca, vLLM): requests join and leave between forward passes.

    Each pass runs every decoding request for one token. Without chunked prefill (vLLM v0's
    default) a pass that can admit waiting requests runs their whole prompts instead, decodes
    paused; with chunked prefill (Sarathi, vLLM v1) prompt chunks fill what the token budget
    leaves beside the decodes. Admission is first come, first served, limited by `max_num_seqs`,
    `max_batched_tokens` and the KV cache, which is paged with no fragmentation (block size 1).
    When a decode step would overflow the cache, the newest request is preempted and later
    recomputed from scratch (vLLM's recompute preemption). With `prefix_caching`, a prompt skips
    a shared prefix this worker has computed before (a prompt's last token is always computed),
    as vLLM's automatic prefix caching does, with two simplifications: a computed prefix stays
    cached for good, and each request still holds its own KV for it (vLLM shares the blocks).

    `padded` prices steps as an engine with a padded KV cache computes them (HF transformers,
    TGI v1, servesim's live engine): new prompts padded to the longest one, decode attending
    over the longest context in the batch, and the whole cache copied whenever rows join or
    leave it. Unpadded (paged, the default) prices the mean context and copies nothing.
    """

    def __init__(
        self,
        max_num_seqs: int,
        max_batched_tokens: int,
        kv_capacity: float,
        chunked_prefill: bool = False,
        prefix_caching: bool = False,
        padded: bool = False,
        max_context: float = math.inf,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.kv_capacity = kv_capacity
        self.max_context = max_context  # the model's context window: prompt + output tokens
        self.chunked_prefill = chunked_prefill
        self.prefix_caching = prefix_caching
        self.padded = padded
        self.longest: list[tuple[int, int, int]] = []  # (-(cached - step_no), finish_step, id): max context
        self.rows_left = False  # padded: requests left the batch since the last step (its cache is compacted)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # admission order: the newest is preempted first
        self.prefilling: dict[int, Request] = {}  # running requests whose prompt is not done
        self.finish_heap: list[tuple[int, int]] = []  # (finish_step, id) of decoding requests
        self.step_no = 0  # decode steps run so far; a decoding request ends at its finish_step
        self.kv_used = 0  # KV tokens held by running requests
        self.decode_seqs = 0
        self.decode_context = 0
        self.prefixes: set[int] = set()  # prefix ids whose KV this worker has computed
        self.closed = False
        self.wake_at = math.inf

    def add(self, req: Request) -> bool:
        req.rejected = reject_reason(req, self.kv_capacity, self.max_context)
        if not req.rejected and not self.chunked_prefill and req.prompt_tokens > self.max_batched_tokens:
            req.rejected = "prompt_exceeds_max_batched_tokens"
        if req.rejected:
            return False
        self.waiting.append(req)
        return True

    def close(self) -> None:
        self.closed = True

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _generated(self, r: Request) -> int:
        # Decoding requests are not touched every step; their progress follows from step_no.
        return r.output_tokens - (r.finish_step - self.step_no)

    def _preempt_newest(self) -> None:
        _, r = self.running.popitem()
        if r.id in self.prefilling:
            del self.prefilling[r.id]
            self.kv_used -= r.prefill_need
        else:
            r.generated = self._generated(r)
            self.kv_used -= r.cached_tokens
            self.decode_seqs -= 1
            self.decode_context -= r.cached_tokens
            r.finish_step = -1  # its heap entry is now stale
        r.prefilled = 0
        r.preemptions += 1
        self.waiting.appendleft(r)

    def _admit(self, now: float, budget: int, prefill: list[tuple[Request, int]]) -> int:
        """Move waiting requests into the batch while budget, seats and KV cache allow."""
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            r = self.waiting[0]
            need = r.prefill_need
            if self.kv_used + self.decode_seqs + need > self.kv_capacity:
                break  # FCFS: nobody overtakes the head of the queue
            skip = r.prefix_tokens if self.prefix_caching and r.prefix_id in self.prefixes else 0
            todo = max(1, need - skip)  # the last token is always computed: it yields the logits
            if self.chunked_prefill:
                chunk = min(todo, budget)
            elif todo <= budget or not prefill:
                chunk = todo  # a lone recomputed request may exceed the budget
            else:
                break
            self.waiting.popleft()
            r.prefilled = r.prefix_cached_tokens = need - todo
            if math.isnan(r.scheduled_at):
                r.scheduled_at = now
            self.running[r.id] = r
            self.prefilling[r.id] = r
            self.kv_used += need
            prefill.append((r, chunk))
            budget -= chunk
        return budget

    def schedule(self, now: float) -> Step | None:
        prefill: list[tuple[Request, int]] = []
        if self.chunked_prefill:
            while self.decode_seqs and self.kv_used + self.decode_seqs > self.kv_capacity:
                self._preempt_newest()
            budget = self.max_batched_tokens - self.decode_seqs
            for r in self.prefilling.values():  # continue prompts already under way
                if budget <= 0:
                    break
                chunk = min(r.prefill_need - r.prefilled, budget)
                prefill.append((r, chunk))
                budget -= chunk
            self._admit(now, budget, prefill)
            decode_seqs = self.decode_seqs
        else:
            self._admit(now, self.max_batched_tokens, prefill)
            decode_seqs = 0 if prefill else self.decode_seqs
            while not prefill and self.decode_seqs and self.kv_used + self.decode_seqs > self.kv_capacity:
                self._preempt_newest()
                decode_seqs = self.decode_seqs
        if not prefill and not decode_seqs:
            return None
        step = Step(prefill=prefill, decode_seqs=decode_seqs)
        chunks = [c for _, c in prefill]
        longest = self._longest_context() if self.padded and self.decode_seqs else 0
        if decode_seqs:
            step.decode_context = decode_seqs * longest if self.padded else self.decode_context
        if self.padded:
            # Dropping rows compacts the cache; adding rows concatenates the new ones to it.
            rows = self.decode_seqs
            if self.rows_left:
                step.reshuffle_tokens += rows * longest
            if prefill and rows:
                step.reshuffle_tokens += (rows + len(prefill)) * max(longest, max(chunks))
            self.rows_left = False
        if prefill:
            step.prefill_seqs = len(prefill)
            step.prefill_len = max(chunks) if self.padded else sum(chunks) / len(chunks)
        else:
            while self.finish_heap and self.running.get(self.finish_heap[0][1]) is None:
                heapq.heappop(self.finish_heap)  # drop entries of preempted requests
            until_finish = self.finish_heap[0][0] - self.step_no
            # With no KV cache (capacity inf) nothing fills up; inf // n is nan, not inf.
            until_full = (self.kv_capacity - self.kv_used) // decode_seqs if self.kv_capacity < math.inf else math.inf
            step.max_repeat = 1 if step.reshuffle_tokens else max(1, int(min(until_finish, until_full)))
            # A new arrival could join the next step only if nobody is queued ahead of it.
            step.interruptible = not self.waiting and len(self.running) < self.max_num_seqs
        return step

    def _longest_context(self) -> int:
        """Cached tokens of the longest decoding request. Every decoding request gains one token
        per step, so its context minus step_no is fixed; the heap holds the largest first."""
        heap = self.longest
        while True:
            offset, finish_step, rid = heap[0]
            r = self.running.get(rid)
            if r is not None and r.finish_step == finish_step and rid not in self.prefilling:
                return self.step_no - offset
            heapq.heappop(heap)

    def postprocess(self, step: Step, now: float, repeat: int = 1) -> list[Request]:
        finished = []
        if step.decode_seqs:
            self.step_no += repeat
            self.kv_used += repeat * step.decode_seqs
            self.decode_context += repeat * step.decode_seqs
            heap = self.finish_heap
            while heap and heap[0][0] <= self.step_no:
                _, rid = heapq.heappop(heap)
                r = self.running.get(rid)
                if r is None or r.finish_step != self.step_no:
                    continue  # stale: the request was preempted since
                r.generated = r.output_tokens
                del self.running[rid]
                self.kv_used -= r.cached_tokens
                self.decode_seqs -= 1
                self.decode_context -= r.cached_tokens
                self.rows_left = True
                self._finish(r, now, finished)
        for r, chunk in step.prefill:
            r.prefilled += chunk
            if r.prefilled < r.prefill_need:
                continue
            del self.prefilling[r.id]
            r.generated += 1  # the pass that completes a prompt yields the next token
            if math.isnan(r.first_token_at):
                r.first_token_at = now
            if r.prefix_id >= 0:
                self.prefixes.add(r.prefix_id)
            if r.done:
                del self.running[r.id]
                self.kv_used -= r.cached_tokens
                self.rows_left = True
                self._finish(r, now, finished)
            else:
                r.finish_step = self.step_no + r.output_tokens - r.generated
                heapq.heappush(self.finish_heap, (r.finish_step, r.id))
                if self.padded:
                    heapq.heappush(self.longest, (-(r.cached_tokens - self.step_no), r.finish_step, r.id))
                self.decode_seqs += 1
                self.decode_context += r.cached_tokens
        return finished

    def _finish(self, r: Request, now: float, finished: list[Request]) -> None:
        r.finished_at = now
        finished.append(r)
