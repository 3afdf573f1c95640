"""The SimPy model of a deployment: replicas (GPUs) of workers, a router, a response cache and an
autoscaler, fed by a request stream and priced by a cost model.

Each worker is one SimPy process driving a batching scheduler (sim.scheduler) exactly as the
live engine does, but advancing SimPy time by the cost model's price of each step instead of
running a model. Runs of decode steps in which nothing arrives or finishes are priced and
advanced as one event, so a request costs a handful of events, not one per token.
"""

from __future__ import annotations

import heapq
import math
import random
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable

import numpy as np
import simpy

from calibration.cost_model import CostModel, cut_run
from calibration.profile import Profile
from sim import memory
from sim.errors import InputError
from sim.request import Request
from sim.scenario import Scenario
from sim.scheduler import ContinuousScheduler, PaddedBatchScheduler
from sim.workload import Trace

REJECT_REASONS = ("", "kv_cache_too_small", "prompt_exceeds_max_batched_tokens", "exceeds_context_window")
MAX_SAMPLES = 2000  # the time series' bound when the scenario sets no sample interval (even: see monitor)
MAX_SET_SAMPLES = 1_000_000  # with one set: an interval of 1e-12 s sampled for ever, filling memory
MEMORY_CHECK_EVERY = 4096  # arrivals or samples: a check reads /proc/meminfo and the cgroups (0.12 ms), and 4,096 queued take a megabyte


def kv_capacity_per_worker(scenario: Scenario, profile: Profile) -> float:
    """KV-cache tokens one worker can hold: what device memory leaves after every worker's weights,
    or `kv_cache_tokens` where the scenario sets fewer."""
    dep = scenario.deployment
    mode = profile.mode(dep.mode, f"{scenario.path}: deployment.mode")
    # Every worker loads the weights, whatever its cache: a kv_cache_tokens skipped this, and a
    # million copies of the model ran as if they fitted.
    usable = profile.memory_bytes * dep.gpu_memory_utilization
    free = usable - dep.workers_per_gpu * mode.weights_bytes
    room = f"{usable / 2**30:.2f} GiB ({dep.gpu_memory_utilization:g} of {profile.device_name})"
    weights = f"the {mode.weights_bytes / 2**30:.2f} GiB model"
    if free <= 0:
        if dep.workers_per_gpu == 1:  # then the memory is what is short
            raise InputError(f"{scenario.path}: deployment.gpu_memory_utilization: {room} does not hold {weights}")
        raise InputError(f"{scenario.path}: deployment.workers_per_gpu: {dep.workers_per_gpu} copies of {weights} "
                         f"do not fit in {room}")
    if mode.kv_bytes_per_token == 0:  # no KV cache: nothing is kept between steps
        # A prompt's later chunks attend to its earlier ones' KV, and a prefix hit reuses another's.
        needs_cache = {"kv_cache_tokens": dep.kv_cache_tokens is not None,
                       "batching.chunked_prefill": dep.batching.chunked_prefill,
                       "batching.prefix_caching": dep.batching.prefix_caching}
        for key, asked in needs_cache.items():
            if asked:
                raise InputError(f"{scenario.path}: deployment.{key}: mode {dep.mode!r} keeps no KV cache "
                                 "(pick a mode with one)")
        return math.inf
    fits = math.floor(free / dep.workers_per_gpu / mode.kv_bytes_per_token)
    if dep.kv_cache_tokens is None:
        return fits
    if dep.kv_cache_tokens > fits:
        raise InputError(f"{scenario.path}: deployment.kv_cache_tokens: {dep.kv_cache_tokens:,} tokens per worker "
                         f"do not fit: {room} less {dep.workers_per_gpu} x {weights} holds at most {fits:,}")
    return dep.kv_cache_tokens


def make_scheduler(scenario: Scenario, profile: Profile, kv_capacity: float):
    b = scenario.deployment.batching
    if b.policy == "continuous":
        return ContinuousScheduler(b.max_num_seqs, b.max_batched_tokens, kv_capacity, b.chunked_prefill,
                                   b.prefix_caching, b.kv_layout == "padded", profile.max_context)
    return PaddedBatchScheduler(b.max_batch_size, kv_capacity, b.max_wait_s if b.policy == "dynamic" else None,
                                profile.max_context)


@dataclass
class Outcome:
    """Per-request results as columns, filled as requests finish (objects are then dropped)."""

    scheduled_at: np.ndarray
    first_token_at: np.ndarray
    finished_at: np.ndarray
    replica: np.ndarray
    worker: np.ndarray
    preemptions: np.ndarray
    prefix_cached_tokens: np.ndarray
    cache_hit: np.ndarray
    rejected: np.ndarray  # index into REJECT_REASONS

    @classmethod
    def empty(cls, n: int) -> Outcome:
        nan = lambda: np.full(n, np.nan)  # noqa: E731
        minus = lambda: np.full(n, -1, dtype=np.int32)  # noqa: E731
        return cls(nan(), nan(), nan(), minus(), minus(), np.zeros(n, np.int32), np.zeros(n, np.int64),
                   np.zeros(n, bool), np.zeros(n, np.int8))

    def record(self, req: Request, replica: int) -> None:
        """Write a finished or rejected request's times and fate into its row."""
        i = req.id
        self.scheduled_at[i], self.first_token_at[i], self.finished_at[i] = (
            req.scheduled_at, req.first_token_at, req.finished_at)
        self.preemptions[i], self.cache_hit[i] = req.preemptions, req.cache_hit
        self.prefix_cached_tokens[i] = req.prefix_cached_tokens
        self.rejected[i] = REJECT_REASONS.index(req.rejected)
        self.worker[i], self.replica[i] = req.worker, replica


@dataclass
class Run:
    """Everything a simulation produced, before summarising."""

    trace: Trace
    outcome: Outcome
    samples: dict[str, array]  # the time series' columns
    actions: list[tuple[float, str, int, int, str]]  # time, action, replicas before, after, reason
    batch_sizes: np.ndarray  # forward passes by batch size (index = rows)
    busy_s: float
    gpu_seconds: float
    kv_capacity: float
    end_s: float


class Worker:
    """One model instance on a GPU: its scheduler, driven in SimPy time."""

    def __init__(self, sim: Simulation, replica: Replica, index: int):
        self.sim, self.replica, self.index = sim, replica, index
        self.scheduler = make_scheduler(sim.scenario, sim.profile, sim.kv_capacity)
        self.process: simpy.Process | None = None
        self.wakeable = False  # idle, or in a run of decode steps that an arrival would change
        self.idle: simpy.Event | None = None  # what an idle worker with no deadline waits on
        self.outstanding = 0
        self.keyed = -1  # its key in the least-outstanding router's heap; -1 while it has none
        # Its last prefill pass and the decodes since (the after-prefill excess). A worker's own, not
        # its device's: a sibling's passes would then change the price of a run already jumped.
        self.last_prefill_tokens = 0.0
        self.decodes_since_prefill = 0

    def submit(self, req: Request) -> None:
        if not self.scheduler.add(req):
            self.sim.finish(req)
            return
        req.worker = self.index
        self.outstanding += 1
        self.sim.busy.add(self)
        self.wake()

    def wake(self) -> None:
        if self.wakeable:
            self.wakeable = False
            if self.idle is not None:  # cheaper than an interrupt (no exception), and the usual case
                self.idle.succeed()
                self.idle = None
            else:
                self.process.interrupt()

    def run(self):
        env, sim, sched = self.sim.env, self.sim, self.scheduler
        cost, slowdown = sim.cost, sim.slowdown
        excess_steps = cost.after_prefill_steps  # 0: the profile prices no after-prefill excess
        while True:
            step = sched.schedule(env.now)
            if step is None:
                if self.replica.draining and self.outstanding == 0:
                    return
                self.wakeable = True
                if sched.wake_at == math.inf:  # sleep until an arrival
                    self.idle = env.event()
                    yield self.idle
                    continue
                try:  # a dynamic batcher's deadline, unless an arrival comes first
                    yield env.timeout(sched.wake_at - env.now)
                except simpy.Interrupt:
                    pass
                self.wakeable = False
                continue
            # A device that sat idle runs its next pass slower (the profile's wake penalty), and so do
            # the first decodes after a prefill (its after-prefill excess). Both are priced into the
            # pass's own event: an event of its own per pass cost the run several percent.
            replica = self.replica
            idle = env.now - replica.last_pass_end if replica.passes_running == 0 else 0.0
            replica.passes_running += 1
            wake = cost.wake_time(idle) if idle > 0.0 else 0.0
            # Only the first decodes after a prefill pay an excess (a prefill is compute-bound, and
            # ran at its grid price): (its tokens, the decodes since) for a step that pays one.
            excess = None
            if excess_steps and not step.prefill_seqs and self.decodes_since_prefill < excess_steps:
                excess = self.last_prefill_tokens, self.decodes_since_prefill
            seqs, context = step.decode_seqs, step.decode_context
            if step.prefill_seqs or step.max_repeat == 1 or not sim.jump:
                repeat, elapsed = 1, cost.step_time(step)
                if excess:
                    elapsed += cost.after_prefill_time(*excess, seqs, context, 1)
                elapsed = wake + elapsed * slowdown
                yield env.timeout(elapsed)
            else:
                repeat, begin = step.max_repeat, env.now
                excess_sums = cost.after_prefill_sums(*excess, seqs, context, repeat) if excess else []
                run_s = run_time(cost, excess_sums, seqs, context, repeat)
                elapsed = wake + run_s * slowdown
                self.wakeable = step.interruptible
                try:
                    yield env.timeout(elapsed)
                except simpy.Interrupt:
                    # Something arrived mid-run: finish the step in progress, then reschedule.
                    repeat, run_s = cut_run(lambda n: run_time(cost, excess_sums, seqs, context, n), repeat,
                                            run_s, max(env.now - begin - wake, 0.0) / slowdown)
                    elapsed = wake + run_s * slowdown
                    yield env.timeout(max(begin + elapsed - env.now, 0.0))
                self.wakeable = False
            replica.passes_running -= 1
            replica.last_pass_end = env.now
            if excess_steps:
                if step.prefill_seqs:
                    self.last_prefill_tokens, self.decodes_since_prefill = step.prefill_seqs * step.prefill_len, 0
                else:
                    self.decodes_since_prefill += repeat
            sim.busy_s += elapsed
            sim.batch_sizes[step.prefill_seqs + step.decode_seqs] += repeat
            for r in sched.postprocess(step, env.now, repeat):
                self.outstanding -= 1
                if not self.outstanding:
                    sim.busy.discard(self)
                if self.outstanding < self.keyed:  # now perhaps the least: key it there
                    sim.least.push(self)
                sim.finish(r)
            if sim.ttft_window is not None and step.prefill:
                for r, _ in step.prefill:
                    if r.first_token_at == env.now:
                        sim.ttft_window.add(env.now, env.now - r.arrived_at)
                        sim.signal_change()


def run_time(cost, excess_sums: list[float], seqs: int, context: float, n: int) -> float:
    """Seconds of n repeats of a decode step, and the after-prefill excess of those that pay one
    (excess_sums: CostModel.after_prefill_sums)."""
    t = cost.decode_run(seqs, context, n)
    return t + excess_sums[min(n, len(excess_sums)) - 1] if excess_sums else t


@dataclass
class Replica:
    """One GPU holding `workers_per_gpu` workers."""

    index: int
    started_at: float
    workers: list[Worker] = field(default_factory=list)
    ready: bool = False
    draining: bool = False
    stopped_at: float = math.inf
    last_pass_end: float = -math.inf  # when the device last finished a forward pass
    passes_running: int = 0  # its workers' passes in flight: while any runs, the device is not idle


class LeastOutstanding:
    """The least-outstanding router's choice, the ready worker with the fewest requests in hand (the
    first ready among equals), in log(workers) steps. With a scan of every ready worker per request,
    100,000 requests on 1,000 replicas simulated in 8.8-10.4 s; 5.1-6.4 s so (benchmarks/NOTES.md).

    A heap of (outstanding, index) entries. Each ready worker has one entry at `keyed`, at most its
    outstanding count: so the top, once its count is found equal, is the least. A worker pushes an
    entry when its count drops below its key; its rise is found when its entry surfaces, and re-keyed
    there; entries left behind are dropped as they surface. Workers become ready in the order they
    were made (every replica added later loads as long), so the lowest index is the first ready: the
    scan's tie-break."""

    def __init__(self, sim: Simulation):
        self.sim = sim
        self.heap: list[tuple[int, int]] = []
        self.limit = 64  # the heap's size past which it is mostly entries left behind: then rebuilt

    def push(self, worker: Worker) -> None:
        """Key a worker at its count: one becoming ready, or one whose count dropped below its key."""
        worker.keyed = worker.outstanding
        heapq.heappush(self.heap, (worker.outstanding, worker.index))
        if len(self.heap) > self.limit:
            ready = self.sim.ready
            for w in ready:
                w.keyed = w.outstanding
            self.heap = [(w.outstanding, w.index) for w in ready]
            heapq.heapify(self.heap)
            self.limit = 4 * len(ready) + 64

    def pick(self) -> Worker:
        heap, workers = self.heap, self.sim.workers
        while True:
            key, index = heap[0]
            worker = workers[index]
            if key != worker.keyed or worker.replica.draining:  # left behind (only ready workers are keyed)
                heapq.heappop(heap)
            elif key < worker.outstanding:  # it rose since: re-key it
                worker.keyed = worker.outstanding
                heapq.heapreplace(heap, (worker.outstanding, index))
            else:
                return worker


class TtftWindow:
    """The TTFTs of the last window, by first-token time, for the latency autoscaler's percentile.

    In numpy arrays, the live ones between `start` and `end`: the percentile reads them in place.
    Kept in a deque, they were copied into an array at every tick, 3.4 ms for a 300-s window at 200
    req/s: 200,000 requests with a 1-s tick ran 11.7-12.2 s, and run 8.3 s reading them in place."""

    def __init__(self):
        self.times, self.values = np.empty(1024), np.empty(1024)
        self.start = self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def add(self, at: float, ttft: float) -> None:  # `at` never decreases: the simulation's clock
        if self.end == len(self.times):  # full: move the live ones to the front, or double
            live = slice(self.start, self.end)
            size = len(self.times) * (2 if len(self) > len(self.times) // 2 else 1)
            self.times, self.values = (np.concatenate([a[live], np.empty(size - len(self))])
                                       for a in (self.times, self.values))
            self.start, self.end = 0, self.end - self.start
        self.times[self.end], self.values[self.end] = at, ttft
        self.end += 1

    def expire(self, before: float) -> None:
        self.start += int(np.searchsorted(self.times[self.start:self.end], before))

    def oldest(self) -> float:
        return float(self.times[self.start])

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.values[self.start:self.end], q))


class Simulation:
    def __init__(self, scenario: Scenario, profile: Profile, trace: Trace, jump: bool = True,
                 progress: Callable[[int], None] | None = None, cost=None):
        self.scenario, self.profile, self.trace, self.jump = scenario, profile, trace, jump
        self.progress = progress  # called with the number of requests done, every 1% or so
        dep = scenario.deployment
        mode = profile.mode(dep.mode, f"{scenario.path}: deployment.mode")
        # Another engine's steps are priced by a model of its own (calibration.paged_steps).
        self.cost = cost if cost is not None else CostModel.of(profile, mode)
        self.slowdown = self.cost.slowdown(dep.workers_per_gpu)
        self.kv_capacity = kv_capacity_per_worker(scenario, profile)
        self.env = simpy.Environment()
        self.rng = random.Random(scenario.seed)
        n = len(trace)
        self.outcome = Outcome.empty(n)
        self.remaining = n
        self.progress_every = max(n // 100, 1)
        self.all_done = self.env.event()
        self.replicas: list[Replica] = []
        # Those not yet stopped, which the autoscaler and the monitor scan: a long run that scales
        # up and down often has made thousands, and scanning them all grew with the run.
        self.live: list[Replica] = []
        self.workers: list[Worker] = []
        self.ready: list[Worker] = []  # workers the router may choose
        # Workers holding a request, which the monitor reads: an idle one has no queue, batch or cache,
        # and reading 100,000 of them at every sample took 229 s over a run of 50 requests.
        self.busy: set[Worker] = set()
        # Workers on loaded replicas not yet stopped, whose KV caches the monitor counts: a draining
        # replica still holds its cache, and its requests still use it.
        self.holding = 0
        self.rr = 0
        self.least = LeastOutstanding(self) if scenario.deployment.router == "least-outstanding" else None
        self.closed = False  # every request has arrived
        self.busy_s = 0.0
        # Forward passes by rows, up to the policy's limit or the requests there are (a limit of 10^9
        # means "no limit", not a billion counters). A list: a numpy item update costs more.
        self.batch_sizes = [0] * (min(self._max_rows(), n) + 1)
        self.actions: list[tuple[float, str, int, int, str]] = []
        self.cache: OrderedDict[int, float] | None = OrderedDict() if scenario.response_cache else None
        auto = scenario.autoscaler
        self.ttft_window: TtftWindow | None = TtftWindow() if auto and auto.policy == "latency" else None
        # Succeeds when a request next arrives, finishes or gets its first token, while the autoscaler
        # sleeps on it (`autoscaler`).
        self.changed: simpy.Event | None = None
        # Typed columns, 8 bytes a sample: in lists a float and its slot took 32, and a set interval keeps
        # up to MAX_SET_SAMPLES. The capacity is a count of tokens, or infinite where the mode keeps no cache.
        capacity = "q" if isinstance(self.kv_capacity, int) else "d"
        self.samples: dict[str, array] = {k: array(code) for k, code in (
            ("time_s", "d"), ("queued", "q"), ("running", "q"), ("replicas", "q"), ("ready_replicas", "q"),
            ("kv_used_tokens", "q"), ("kv_capacity_tokens", capacity))}

    def _max_rows(self) -> int:
        b = self.scenario.deployment.batching
        return b.max_num_seqs if b.policy == "continuous" else b.max_batch_size

    # --- replicas ---------------------------------------------------------------------------

    def add_replica(self, cold_start_s: float) -> None:
        replica = Replica(len(self.replicas), self.env.now)
        self.replicas.append(replica)
        self.live.append(replica)
        for _ in range(self.scenario.deployment.workers_per_gpu):
            worker = Worker(self, replica, len(self.workers))
            replica.workers.append(worker)
            self.workers.append(worker)
        self.env.process(self._start(replica, cold_start_s))

    def _start(self, replica: Replica, cold_start_s: float):
        if cold_start_s > 0:
            yield self.env.timeout(cold_start_s)
        replica.ready = True
        if replica.stopped_at == math.inf:  # not drained while it loaded
            self.holding += len(replica.workers)
        if not replica.draining:
            self.ready.extend(replica.workers)
            if self.least is not None:
                for worker in replica.workers:
                    self.least.push(worker)
        for worker in replica.workers:
            if self.remaining == 0 or self.closed:
                worker.scheduler.close()
            worker.process = self.env.process(self._serve(worker))

    def _serve(self, worker: Worker):
        yield from worker.run()
        replica = worker.replica
        if all(w.outstanding == 0 for w in replica.workers) and replica.stopped_at == math.inf:
            self._stop(replica)

    def _stop(self, replica: Replica) -> None:
        replica.stopped_at = self.env.now
        self.live.remove(replica)
        if replica.ready:
            self.holding -= len(replica.workers)

    def drain_replica(self) -> None:
        replica = next(r for r in reversed(self.live) if not r.draining)
        replica.draining = True
        self.ready = [w for w in self.ready if w.replica is not replica]
        for worker in replica.workers:
            worker.scheduler.close()  # a static batcher must not wait for a batch that won't come
            worker.wake()
        if not replica.ready:  # still loading: give the GPU back at once
            self._stop(replica)

    def active_replicas(self) -> list[Replica]:
        return [r for r in self.live if not r.draining]

    # --- requests ---------------------------------------------------------------------------

    def arrivals(self):
        env, cache, n = self.env, self.cache, len(self.trace)
        for row in self.trace.rows():
            if row[0] % MEMORY_CHECK_EVERY == 0:
                memory.check(n, row[0], len(self.samples["time_s"]))
            t = row[1]
            if t > env.now:
                yield env.timeout(t - env.now)
            req = Request(*row)
            if cache is not None and req.prompt_key >= 0 and cache.get(req.prompt_key, -1.0) > t:
                cache.move_to_end(req.prompt_key)
                req.cache_hit = True
                req.scheduled_at = req.first_token_at = req.finished_at = t
                req.generated = req.output_tokens
                self.finish(req)
                continue
            self.route(req)
        self.closed = True
        for worker in self.workers:
            worker.scheduler.close()
            worker.wake()

    def route(self, req: Request) -> None:
        ready = self.ready
        if not ready:  # every replica still loading: wait in the first one's queue
            ready = self.active_replicas()[0].workers
        router = self.scenario.deployment.router
        if router == "round-robin":
            worker = ready[self.rr % len(ready)]
            self.rr += 1
        elif router == "random":
            worker = ready[self.rng.randrange(len(ready))]
        elif ready is self.ready:
            worker = self.least.pick()
        else:  # every replica loading: their workers are not in the heap
            worker = min(ready, key=attrgetter("outstanding"))
        worker.submit(req)
        self.signal_change()

    def signal_change(self) -> None:
        if self.changed is not None:
            self.changed.succeed()
            self.changed = None

    def finish(self, req: Request) -> None:
        self.outcome.record(req, self.workers[req.worker].replica.index if req.worker >= 0 else -1)
        cache, spec = self.cache, self.scenario.response_cache
        if cache is not None and req.prompt_key >= 0 and not req.rejected and not req.cache_hit:
            cache[req.prompt_key] = self.env.now + spec.ttl_s
            cache.move_to_end(req.prompt_key)
            if len(cache) > spec.capacity:
                cache.popitem(last=False)
        self.remaining -= 1
        self.signal_change()
        if self.progress is not None and self.remaining % self.progress_every == 0:
            self.progress(len(self.trace) - self.remaining)
        if self.remaining == 0:
            self.all_done.succeed()

    # --- control and observation ------------------------------------------------------------

    def autoscaler(self):
        spec, env = self.scenario.autoscaler, self.env
        every = float(spec.interval_s)  # a float: its times print alike whether YAML gave 5 or 5.0
        last_action = -math.inf
        k = 0  # it acts at ticks k * every
        while True:
            k += 1
            yield env.timeout(max(k * every - env.now, 0.0))
            active = self.active_replicas()
            n = len(active)
            outstanding = sum(w.outstanding for r in active for w in r.workers)
            window = self.ttft_window
            if spec.policy == "queue-depth":
                desired = math.ceil(outstanding / spec.target_queue_per_replica)
                reason = f"{outstanding} outstanding, target {spec.target_queue_per_replica:g}/replica"
            else:
                window.expire(env.now - spec.window_s)
                if window:
                    p = window.percentile(spec.percentile)
                    desired = (n + 1 if p > spec.target_ttft_s else
                               n - 1 if p < spec.target_ttft_s * spec.scale_down_ratio else n)
                    reason = f"p{spec.percentile:g} TTFT {p:.3f}s, target {spec.target_ttft_s:g}s"
                elif outstanding:  # no TTFT yet to judge by: the requests in hand have not reached a first token
                    desired, reason = n, ""
                else:  # idle: with no TTFT to judge by, holding would keep idle replicas through a lull
                    desired, reason = n - 1, f"idle: no request in the last {spec.window_s:g}s"
            desired = min(max(desired, spec.min_replicas), spec.max_replicas)
            if desired == n or env.now - last_action < spec.cooldown_s:
                # It holds until a request arrives, finishes or gets its first token, the window's oldest
                # TTFT ages out or the cooldown ends: sleep through the ticks before the first of them
                # (ticking through lulls took hours).
                until = math.inf if desired == n else last_action + spec.cooldown_s
                if window:
                    until = min(until, window.oldest() + spec.window_s)
                k = yield from self._sleep(k, every, until)
                continue
            last_action = env.now
            self.actions.append((env.now, "scale_up" if desired > n else "scale_down", n, desired, reason))
            for _ in range(abs(desired - n)):
                if desired > n:
                    self.add_replica(self.profile.model_load_s)
                else:
                    self.drain_replica()

    def _sleep(self, k: int, every: float, until: float):
        """Sleep from tick k to the last tick before `until` at most, or until signal_change; return
        the tick to go on from."""
        last = math.inf if until == math.inf else math.floor(until / every) - 1  # a tick surely before it
        if last <= k + 1:
            return k  # a tick or two: tick them
        self.changed = self.env.event()
        wake = [self.changed] if last == math.inf else [self.changed, self.env.timeout(last * every - self.env.now)]
        yield self.env.any_of(wake)
        self.changed = None
        return max(k, math.floor(self.env.now / every))  # the next tick is the first after the wake

    def monitor(self, interval: float, bounded: bool):
        env, s = self.env, self.samples
        while True:
            queued = running = kv_used = 0
            for worker in self.busy:  # sums of ints: the set's order does not matter; one pass, not three
                sched = worker.scheduler
                queued += sched.num_waiting
                running += sched.num_running
                kv_used += sched.kv_used
            s["time_s"].append(env.now)
            s["queued"].append(queued)
            s["running"].append(running)
            s["replicas"].append(len(self.live))
            s["ready_replicas"].append(len(self.ready) // self.scenario.deployment.workers_per_gpu)
            s["kv_used_tokens"].append(kv_used)
            s["kv_capacity_tokens"].append(self.kv_capacity * self.holding)
            if bounded and len(s["time_s"]) > MAX_SAMPLES:
                # The default interval spreads ~1,000 samples over the arrivals, but a run can last far
                # past them: a saturation flood, every request at 0 s, sampled every 10 ms for an hour,
                # spent 60% of its time here. Keep every other sample and sample half as often: with an
                # odd count (MAX_SAMPLES + 1) the kept ones stay evenly spaced.
                for column in s.values():
                    del column[1::2]
                interval *= 2
            elif len(s["time_s"]) > MAX_SET_SAMPLES:  # a set interval is kept, up to a point
                raise InputError(f"{self.scenario.path}: output.sample_interval_s: {interval:g} s took "
                                 f"{MAX_SET_SAMPLES:,} samples by {env.now:.6g} s into the run: raise it")
            elif len(s["time_s"]) % MEMORY_CHECK_EVERY == 0:  # samples still grow once the requests have arrived
                arrived = int(np.searchsorted(self.trace.arrived_at, env.now))
                memory.check(len(self.trace), arrived, len(s["time_s"]))
            yield env.timeout(interval)

    def run(self) -> Run:
        env = self.env
        for _ in range(self.scenario.deployment.replicas):
            self.add_replica(0.0)
        env.process(self.arrivals())
        if self.scenario.autoscaler is not None:
            env.process(self.autoscaler())
        span = float(self.trace.arrived_at[-1]) if len(self.trace) else 0.0
        interval = self.scenario.sample_interval_s
        env.process(self.monitor(interval or max(span / 1000, 0.01), bounded=interval is None))
        env.run(until=self.all_done)
        end = env.now
        # fsum: the exact sum on every Python (3.12 made sum() of floats compensated, moving the last digit)
        gpu_seconds = math.fsum(min(r.stopped_at, end) - r.started_at for r in self.replicas)
        return Run(self.trace, self.outcome, self.samples, self.actions, np.array(self.batch_sizes, np.int64),
                   self.busy_s, gpu_seconds, self.kv_capacity, end)


def simulate(scenario: Scenario, profile: Profile, trace: Trace, jump: bool = True,
             progress: Callable[[int], None] | None = None, cost=None) -> Run:
    return Simulation(scenario, profile, trace, jump, progress, cost).run()


def saturation_rps(scenario: Scenario, profile: Profile, trace: Trace, cost=None) -> float:
    """Served requests per second when the trace's requests all queue at once: the most the
    deployment can serve of this request mix with every replica backlogged.

    It sums each replica's own rate (its share over its time) rather than dividing all requests
    by the last finish, which the unluckiest share sets: a finite-sample effect. On the steady
    workload's long-tailed lengths, dynamic batching on 8 replicas finished its 2,000-request
    flood between 229 s and 300 s; the last finish gave 6.67 req/s there and 7.44 on 20,000
    requests, the sum 7.95 and 7.81.
    """
    flood = Trace(np.zeros(len(trace)), trace.prompt_tokens, trace.output_tokens)
    outcome = simulate(scenario, profile, flood, cost=cost).outcome
    served = np.isfinite(outcome.finished_at)
    finished, replica = outcome.finished_at[served], outcome.replica[served]
    return float(sum((replica == r).sum() / finished[replica == r].max() for r in np.unique(replica)))
