"""Scenario files: workload, deployment, autoscaler, caches, SLO and cost, validated.

Every problem is reported as `file: key.path: problem` (an InputError), never a traceback.
See scenarios/*.yaml for commented examples of every section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sim.errors import InputError
from sim.fields import Fields, parse_yaml, read_yaml
from sim.workload import MAX_REQUESTS, MAX_STATE_CHANGES, Trace, peak_rate, read_trace, state_changes

POLICIES = ("static", "dynamic", "continuous")
ROUTERS = ("round-robin", "least-outstanding", "random")
AUTOSCALERS = ("off", "queue-depth", "latency")
SLO_METRICS = ("ttft", "tpot", "e2e")
# The largest deployment a scenario or plan may name: each replica is simulated, so 10^12 of them
# filled memory before the first request arrived.
MAX_REPLICAS = 100_000


@dataclass(frozen=True)
class Lengths:
    kind: str  # fixed | uniform | lognormal | empirical
    value: int = 0
    low: int = 0
    high: int = 0
    median: float = 0.0
    sigma: float = 0.0
    min: int = 1
    max: int = 1_000_000
    samples: np.ndarray | None = None


@dataclass(frozen=True)
class Arrivals:
    kind: str
    params: dict[str, Any]
    trace: Trace | None = None


@dataclass(frozen=True)
class Workload:
    where: str
    arrivals: Arrivals
    prompt_tokens: Lengths | None
    output_tokens: Lengths | None
    num_requests: int | None
    duration_s: float | None
    prompt_keys: tuple[int, float] | None  # (distinct prompts, Zipf exponent)
    shared_prefix: tuple[int, int, float] | None  # (groups, tokens, fraction of requests)


@dataclass(frozen=True)
class Batching:
    policy: str
    max_batch_size: int = 8  # static, dynamic
    max_wait_s: float = 0.05  # dynamic
    max_num_seqs: int = 256  # continuous
    max_batched_tokens: int = 8192  # continuous
    chunked_prefill: bool = False
    prefix_caching: bool = False
    kv_layout: str = "paged"  # paged (vLLM) | padded (HF transformers, TGI v1, the live engine)


@dataclass(frozen=True)
class Deployment:
    profile: Path
    mode: str
    replicas: int
    workers_per_gpu: int
    router: str
    batching: Batching
    gpu_memory_utilization: float
    kv_cache_tokens: int | None


@dataclass(frozen=True)
class Autoscaler:
    policy: str
    min_replicas: int
    max_replicas: int
    interval_s: float
    cooldown_s: float
    target_queue_per_replica: float = 0.0
    target_ttft_s: float = 0.0
    percentile: float = 95.0
    window_s: float = 30.0
    scale_down_ratio: float = 0.5


@dataclass(frozen=True)
class ResponseCache:
    ttl_s: float
    capacity: int


@dataclass(frozen=True)
class SloTarget:
    metric: str  # ttft | tpot | e2e
    max_s: float
    percentile: float


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    seed: int
    workload: Workload
    deployment: Deployment
    autoscaler: Autoscaler | None
    response_cache: ResponseCache | None
    slo: tuple[SloTarget, ...]
    usd_per_gpu_hour: float
    sample_interval_s: float | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def _lengths(section: Fields, base: Path, trace_column: int) -> Lengths:
    kind = section.str("kind", choices=("fixed", "uniform", "lognormal", "empirical"))
    if kind == "fixed":
        spec = Lengths(kind, value=section.num("value", integer=True, low=1))
    elif kind == "uniform":
        low = section.num("low", integer=True, low=1)
        high = section.num("high", integer=True, low=low)
        spec = Lengths(kind, low=low, high=high)
    elif kind == "lognormal":
        lo = section.num("min", 1, integer=True, low=1)
        spec = Lengths(kind, median=section.num("median", positive=True), sigma=section.num("sigma", low=0),
                       min=lo, max=section.num("max", 1_000_000, integer=True, low=lo))
    else:
        trace = _trace(section, base)
        spec = Lengths(kind, samples=(trace.prompt_tokens, trace.output_tokens)[trace_column])
    section.done()
    return spec


def _trace(section: Fields, base: Path) -> Trace:
    path = Path(section.str("trace"))
    try:
        return read_trace(path if path.is_absolute() else base / path)
    except InputError as e:
        section.fail(str(e), "trace")


def _arrivals(s: Fields, base: Path) -> Arrivals:
    kind = s.str("kind", choices=("poisson", "gamma", "bursty", "diurnal", "step", "ramp", "trace"))
    p: dict[str, Any] = {}
    trace = None
    if kind in ("poisson", "gamma"):
        p["rate"] = s.num("rate", positive=True)
        if kind == "gamma":
            # A cv past 100 clusters 10^4 arrivals at an instant; at 10^6 the gaps were all 0.0, and
            # drawing them until duration_s filled memory.
            p["cv"] = s.num("cv", positive=True, high=100)
    elif kind in ("bursty", "step"):
        durations_key = "mean_durations_s" if kind == "bursty" else "durations_s"
        p["rates"] = s.nums("rates", low=0)
        p[durations_key] = s.nums(durations_key, positive=True)
        if len(p["rates"]) != len(p[durations_key]):
            s.fail(f"needs one duration per rate ({len(p['rates'])} rates)", durations_key)
        if max(p["rates"]) <= 0:
            s.fail("at least one rate must be > 0", "rates")
    elif kind == "diurnal":
        p["mean_rate"] = s.num("mean_rate", positive=True)
        p["amplitude"] = s.num("amplitude", low=0, high=1)
        p["period_s"] = s.num("period_s", 86400.0, positive=True)
        p["phase_s"] = s.num("phase_s", 0.0)
    elif kind == "ramp":
        p["start_rate"] = s.num("start_rate", low=0)
        p["end_rate"] = s.num("end_rate", low=0)
        p["duration_s"] = s.num("duration_s", positive=True)
        if max(p["start_rate"], p["end_rate"]) <= 0:
            s.fail("start_rate or end_rate must be > 0", "end_rate")
    else:
        trace = _trace(s, base)
        p["time_scale"] = s.num("time_scale", 1.0, positive=True)
    s.done()
    return Arrivals(kind, p, trace)


def _workload(w: Fields, base: Path) -> Workload:
    arrivals = _arrivals(w.section("arrivals", required=True), base)
    num_requests = w.num("num_requests", None, integer=True, low=1, high=MAX_REQUESTS)
    duration_s = w.num("duration_s", None, positive=True)
    if num_requests is None and duration_s is not None and arrivals.kind != "trace":
        peak = peak_rate(arrivals)
        if peak * duration_s > MAX_REQUESTS:
            w.fail(f"{duration_s:g} s at up to {peak:g} req/s may ask for {peak * duration_s:.3g} requests, "
                   f"more than a run holds ({MAX_REQUESTS:,}): shorten it or give num_requests", "duration_s")
    if arrivals.kind == "trace":
        for key in ("prompt_tokens", "output_tokens"):
            if w.has(key):
                w.fail("not used with trace arrivals: lengths come from the trace", key)
        if num_requests is not None and num_requests > len(arrivals.trace):
            w.fail(f"the trace holds {len(arrivals.trace):,} requests: ask for at most that many, or leave "
                   "it out to replay them all", "num_requests")
        prompt = output = None
    else:
        if num_requests is None and duration_s is None:
            w.fail("give num_requests or duration_s", "num_requests")
        if arrivals.kind == "bursty":
            changes = state_changes(arrivals, num_requests, duration_s)
            if changes > MAX_STATE_CHANGES:
                times = f"about {changes:.3g} times" if math.isfinite(changes) else "without end"
                w.fail(f"at these rates and durations the states change {times} before the last arrival, "
                       f"more than a run draws ({MAX_STATE_CHANGES:,}): lengthen the states or raise the rates",
                       "arrivals.mean_durations_s")
        # A step or ramp schedule's final rate holds after it ends; at 0, arrivals stop there, and
        # a request count the schedule fell short of would be waited for forever.
        if duration_s is None and arrivals.kind in ("step", "ramp"):
            key = "rates" if arrivals.kind == "step" else "end_rate"
            final = arrivals.params[key][-1] if arrivals.kind == "step" else arrivals.params[key]
            if final <= 0:
                w.fail("the final rate holds after the schedule and is 0, so num_requests may never all "
                       "arrive: make it > 0 or give duration_s", f"arrivals.{key}")
        prompt = _lengths(w.section("prompt_tokens", required=True), base, 0)
        output = _lengths(w.section("output_tokens", required=True), base, 1)
    keys = w.section("prompt_keys")
    prompt_keys = None
    if keys is not None:
        # One Zipf weight per distinct prompt: more than a run's requests would only fill memory.
        prompt_keys = (keys.num("distinct", integer=True, low=1, high=MAX_REQUESTS), keys.num("zipf", 1.0, low=0))
        keys.done()
    prefix = w.section("shared_prefix")
    shared_prefix = None
    if prefix is not None:
        shared_prefix = (prefix.num("groups", integer=True, low=1), prefix.num("tokens", integer=True, low=1),
                         prefix.num("fraction", 1.0, low=0, high=1))
        prefix.done()
    w.done()
    return Workload(f"{w.file}: {w.where()}", arrivals, prompt, output, num_requests, duration_s, prompt_keys,
                    shared_prefix)


def _batching(b: Fields) -> Batching:
    policy = b.str("policy", choices=POLICIES)
    if policy == "continuous":
        spec = Batching(policy, max_num_seqs=b.num("max_num_seqs", 256, integer=True, low=1),
                        max_batched_tokens=b.num("max_batched_tokens", 8192, integer=True, low=1),
                        chunked_prefill=b.bool("chunked_prefill", False),
                        prefix_caching=b.bool("prefix_caching", False),
                        kv_layout=b.str("kv_layout", "paged", choices=("paged", "padded")))
        # Each running sequence decodes one token a step, inside the budget. Under max_num_seqs the
        # budget capped the batch with chunked prefill and was overrun without it; vLLM refuses it.
        if spec.max_batched_tokens < spec.max_num_seqs:
            b.fail(f"{spec.max_batched_tokens} tokens is less than max_num_seqs ({spec.max_num_seqs}): every "
                   "running sequence decodes a token in each step, within this budget (vLLM refuses it too)",
                   "max_batched_tokens")
        # Both work on a paged cache's blocks; a padded cache (HF generate, TGI v1) has neither.
        for key in ("chunked_prefill", "prefix_caching"):
            if spec.kv_layout == "padded" and getattr(spec, key):
                b.fail(f"{key.replace('_', ' ')} needs a paged KV cache (kv_layout: paged)", key)
    else:
        spec = Batching(policy, max_batch_size=b.num("max_batch_size", 8, integer=True, low=1),
                        max_wait_s=b.num("max_wait_ms", 50.0, low=0) / 1000 if policy == "dynamic" else 0.0)
    b.done()
    return spec


def _deployment(d: Fields, base: Path) -> Deployment:
    from calibration.profile import resolve  # no torch: profiles are plain JSON

    name = d.str("profile")
    try:
        profile = resolve(name, base)
    except InputError as e:
        d.fail(str(e), "profile")
    spec = Deployment(
        profile=profile,
        mode=d.str("mode"),
        replicas=d.num("replicas", 1, integer=True, low=1, high=MAX_REPLICAS),
        workers_per_gpu=d.num("workers_per_gpu", 1, integer=True, low=1),
        router=d.str("router", "least-outstanding", choices=ROUTERS),
        batching=_batching(d.section("batching", required=True)),
        gpu_memory_utilization=d.num("gpu_memory_utilization", 0.9, positive=True, high=1),
        kv_cache_tokens=d.num("kv_cache_tokens", None, integer=True, low=1),
    )
    d.done()
    return spec


def _autoscaler(a: Fields | None, replicas: int) -> Autoscaler | None:
    if a is None:
        return None
    policy = a.str("policy", choices=AUTOSCALERS)
    if policy == "off":
        a.done()
        return None
    lo = a.num("min_replicas", 1, integer=True, low=1, high=MAX_REPLICAS)
    hi = a.num("max_replicas", integer=True, low=lo, high=MAX_REPLICAS)
    if not lo <= replicas <= hi:
        a.fail(f"deployment.replicas ({replicas}) must lie within min_replicas..max_replicas ({lo}..{hi})",
               "max_replicas")
    # Real autoscalers act every 15-60 s; one acting every 1e-12 s ran for ever between two arrivals.
    common = dict(policy=policy, min_replicas=lo, max_replicas=hi, interval_s=a.num("interval_s", 10.0, low=0.01),
                  cooldown_s=a.num("cooldown_s", 30.0, low=0))
    if policy == "queue-depth":
        spec = Autoscaler(**common, target_queue_per_replica=a.num("target_queue_per_replica", positive=True))
    else:
        spec = Autoscaler(**common, target_ttft_s=a.num("target_ttft_s", positive=True),
                          percentile=a.num("percentile", 95.0, positive=True, high=100),
                          window_s=a.num("window_s", 30.0, positive=True),
                          scale_down_ratio=a.num("scale_down_ratio", 0.5, positive=True, high=1))
    a.done()
    return spec


def _slo(s: Fields | None) -> tuple[SloTarget, ...]:
    if s is None:
        return ()
    targets = []
    for metric in SLO_METRICS:
        t = s.section(metric)
        if t is not None:
            targets.append(SloTarget(metric, t.num("max_s", positive=True),
                                     t.num("percentile", 95.0, positive=True, high=100)))
            t.done()
    s.done()
    return tuple(targets)


def apply_overrides(data: Any, overrides: list[str], file: str) -> Any:
    """Apply `key.path=value` overrides (values in YAML: 4, true, {policy: dynamic})."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected key.path=value")
        # YAML reads nothing as null, which is the default: `--set deployment.replicas=$N` with N
        # unset ran on the scenario's default replicas without a word.
        if not text.strip():
            raise InputError(f"--set {item!r}: no value (to unset the key, write {key}=null)")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError:
            raise InputError(f"--set {item!r}: the value is not valid YAML") from None
        set_value(data, key, value, f"{file}: --set {key}")
    return data


def set_value(data: Any, key: str, value: Any, where: str) -> None:
    """Set `value` at the dotted path `key` of `data`; `where` begins any error message."""
    node, parts = data, key.split(".")
    # A mapping may hold a dotted key of its own (a plan's `search: {deployment.replicas: ...}`),
    # and a list is indexed by number (`hardware.0.usd_per_gpu_hour`).
    while len(parts) > 1 and not (isinstance(node, dict) and ".".join(parts) in node):
        part = parts.pop(0)
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and isinstance(node.get(part, {}), (dict, list)):
            node = node.setdefault(part, {})
        else:
            raise InputError(f"{where}: {part!r} is not a mapping or an index into a list")
    last = ".".join(parts)
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise InputError(f"{where}: {last!r} is not an index into its list")
        node[int(last)] = value
    else:
        node[last] = value


def load(path: str | Path, overrides: list[str] = ()) -> Scenario:
    path = Path(path)
    data = read_yaml(path, "scenario")
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, list(overrides), str(path))
    return parse(data, str(path), path.parent)


def parse(data: Any, file: str, base: Path) -> Scenario:
    top = Fields(data, file)
    if not top.has("workload") and top.has("base"):  # the plans in scenarios/experiments/ name a base
        top.fail("this is a plan (it names a base scenario): run `plan " + file + "`", "workload")
    workload = _workload(top.section("workload", required=True), base)
    deployment = _deployment(top.section("deployment", required=True), base)
    cost = top.section("cost")
    usd = 0.0
    if cost is not None:
        usd = cost.num("usd_per_gpu_hour", low=0)
        cost.done()
    output = top.section("output")
    interval = None
    if output is not None:
        interval = output.num("sample_interval_s", None, positive=True)
        output.done()
    scenario = Scenario(
        name=top.name("name", Path(file).stem),
        path=file,
        seed=top.num("seed", 0, integer=True, low=0),
        workload=workload,
        deployment=deployment,
        autoscaler=_autoscaler(top.section("autoscaler"), deployment.replicas),
        response_cache=_response_cache(top.section("response_cache")),
        slo=_slo(top.section("slo")),
        usd_per_gpu_hour=usd,
        sample_interval_s=interval,
        raw=data,
    )
    top.done()
    return scenario


def _response_cache(c: Fields | None) -> ResponseCache | None:
    if c is None:
        return None
    spec = ResponseCache(ttl_s=c.num("ttl_s", positive=True), capacity=c.num("capacity", integer=True, low=1))
    c.done()
    return spec
