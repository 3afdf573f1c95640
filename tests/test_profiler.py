"""`profile --quick` on the tiny model: a real measurement, written as a loadable profile."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from conftest import ROOT


def test_quick_cpu_profile_is_measured_and_loadable(tmp_path):
    pytest.importorskip("torch")
    from calibration.profile import SHIPPED, load
    from profiler.measure import AFTER_PREFILL_DECODES, after_prefill_rows

    shipped = (SHIPPED / "cpu-llama-tiny.json").read_bytes()
    proc = subprocess.run([sys.executable, "-m", "profiler.cli", "--device", "cpu", "--model", "llama-tiny",
                           "--quick", "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    # A quick grid is a smoke check: by default it lands beside the results, never over the shipped profile.
    assert (SHIPPED / "cpu-llama-tiny.json").read_bytes() == shipped
    out = tmp_path / "results/profiles/cpu-llama-tiny-quick.json"
    profile = load(out)
    assert profile.name == "cpu-llama-tiny-quick"
    assert set(profile.modes) == {"fp32-nocache", "fp32"}
    cached, baseline = profile.modes["fp32"], profile.modes["fp32-nocache"]
    assert cached.kv_bytes_per_token == 4 * 2 * 2 * 64 * 4  # layers x (K,V) x kv heads x head dim x fp32
    assert baseline.kv_bytes_per_token == 0 and cached.weights_bytes > 0
    # Without a cache a decode step over c tokens is the prefill of c + 1: one grid, not measured twice.
    assert (baseline.decode.x == baseline.prefill.x - 1).all()
    assert (baseline.decode.seconds == baseline.prefill.seconds).all()
    # ... and its passes are the cached mode's with K and V dropped: timed once, for both.
    assert baseline.raw["passes_of"] == "fp32" and (baseline.prefill.seconds == cached.prefill.seconds).all()
    assert (cached.decode.seconds > 0).all() and (cached.prefill.seconds > 0).all()
    assert profile.model_load_s > 0 and set(cached.concurrency) == {1, 2}
    # The wake penalty: one figure per idle gap, never shrinking as the gap grows.
    for mode in (cached, baseline):
        extra = mode.wake.extra_s
        assert len(extra) == len(mode.wake.gap_s) and min(extra) >= 0 and list(extra) == sorted(extra)
    # The decodes just after a prefill: for each decode row count and each prompt length of the
    # grid, how much slower each of the first decodes ran, never more than the one before it; none
    # measured without a KV cache.
    after = cached.after_prefill
    assert baseline.after_prefill is None and after.tokens == tuple(cached.prefill.x)
    assert after.rows == after_prefill_rows(int(cached.decode.batch[-1])) == (1, 4)
    for table in after.excess:
        for row in table:
            assert len(row) == AFTER_PREFILL_DECODES and min(row) >= 0 and list(row) == sorted(row, reverse=True)
    # Calibration floods through the live engine, one of 8 requests after each grid column (the
    # quick grid: 4 columns, one sweep): every step a prefill or a decode of at most 8 rows; none
    # without a KV cache.
    flood = cached.flood
    assert baseline.flood is None and len(flood.forward_s) > 32 and (flood.forward_s > 0).all()
    assert ((flood.prefill_seqs > 0) != (flood.decode_seqs > 0)).all()
    assert flood.prefill_seqs.sum() == 32 and flood.decode_seqs.max() == 8
    assert (flood.overhead_s > 0).all() and flood.reshuffle_tokens.any()  # rows left, and were copied out
    from calibration.cost_model import CostModel, EngineOverhead
    from sim.scheduler import Step

    # The floods' passes, timed inside the live engine, cost what the grid prices them at to within
    # 2x: the grid times the model the engine runs.
    cost = CostModel(cached)
    shapes = zip(flood.prefill_seqs.tolist(), flood.prefill_len.tolist(), flood.decode_seqs.tolist(),
                 flood.decode_context.tolist())
    priced = sum(cost.forward_time(Step(prefill_seqs=int(b), prefill_len=p, decode_seqs=int(d), decode_context=c))
                 for b, p, d, c in shapes)
    assert 0.5 < flood.forward_s.sum() / priced < 2.0
    # The live engine's loop outside the model, fitted from the floods: real, far below a step of the
    # model itself, and over the floods' steps it adds up to what they spent outside the model.
    overhead = EngineOverhead.fit(profile)
    assert 0 < overhead.step_s < float(cached.decode.seconds.min())
    priced = (overhead.step_s * len(flood.overhead_s) + overhead.row_s * (flood.prefill_seqs + flood.decode_seqs).sum()
              + overhead.copy_s_per_byte * cached.kv_bytes_per_token * flood.reshuffle_tokens.sum())
    assert priced == pytest.approx(flood.overhead_s.sum(), rel=0.1)
    raw = json.loads(out.read_text())
    assert raw["device"]["type"] == "cpu" and raw["device"]["copy_bytes_per_s"] > 0
    assert raw["device"]["threads"] == 1  # the thread count `validate` runs its live engine with
    report = out.with_suffix(".html").read_text()  # the Plotly report beside it
    assert len(report) > 100_000
    # This grid's 2 x 2 lines are too few to leave one out: said in words, as `profile` prints it.
    assert "n/a (grid too small)" in report and "nan%" not in report


def test_a_checkpoints_profile_names_the_folder_the_live_engine_rebuilds_it_from(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, vocab_size=256, max_position_embeddings=4096)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "ckpt.json"
    proc = subprocess.run([sys.executable, "-m", "profiler.cli", "--device", "cpu", "--model", "ckpt", "--quick",
                           "--modes", "fp32", "--quiet", "--no-report", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)  # a path relative to here
    assert proc.returncode == 0, proc.stderr
    from calibration.profile import load
    from profiler.live_engine import build_for_profile
    from profiler.models import lookup
    from sim.errors import InputError

    profile = load(out)
    assert profile.model_name == str((tmp_path / "ckpt").resolve()) and profile.max_context == 4096
    assert build_for_profile(profile, "fp32", torch.device("cpu")).config.hidden_size == 64
    with pytest.raises(InputError, match="model checkpoint '/nowhere/ckpt' not found"):
        lookup("/nowhere/ckpt")  # the profile read on a machine without the checkpoint


def test_a_folder_holding_only_a_config_builds_that_model_with_random_weights(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig

    from profiler.models import build, lookup
    from sim.errors import InputError

    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=128, vocab_size=256).save_pretrained(tmp_path / "card")  # config.json alone
    assert [p.name for p in (tmp_path / "card").iterdir()] == ["config.json"]
    model = build(lookup(str(tmp_path / "card")), torch.float32, torch.device("cpu"))
    assert model.config.hidden_size == 64 and model.config.model_type == "llama"
    (tmp_path / "card" / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(InputError, match="cannot build a model from it: .*no-such-architecture"):
        build(lookup(str(tmp_path / "card")), torch.float32, torch.device("cpu"))
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=128, vocab_size=256, max_position_embeddings=40).save_pretrained(tmp_path / "card")
    with pytest.raises(InputError, match="config.json: llama: a context window of 40 positions; profiling needs at "
                                         "least 64"):
        build(lookup(str(tmp_path / "card")), torch.float32, torch.device("cpu"))
    # Causal LMs servesim cannot serve: they stopped the sweeps on an AttributeError.
    from transformers import BertConfig, MambaConfig

    for config, message in ((BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, vocab_size=64), "bert keeps no KV cache"),
                            (MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4),
                             "mamba names no context window")):
        config.save_pretrained(tmp_path / "card")
        with pytest.raises(InputError, match=f"config.json: {message}"):
            build(lookup(str(tmp_path / "card")), torch.float32, torch.device("cpu"))
    # Configs transformers cannot build, or builds but cannot run: huggingface_hub's validation
    # error and torch's RuntimeError were tracebacks.
    llama = {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 512}
    for change, message in (({"num_attention_heads": 3}, "cannot build a model from it: The hidden size \\(64\\) is "
                                                         "not a multiple of the number of attention heads \\(3\\)"),
                            ({"num_key_value_heads": 3}, "config.json: llama: a forward pass fails: The size of tensor")):
        (tmp_path / "card" / "config.json").write_text(json.dumps(llama | change))
        with pytest.raises(InputError, match=message):
            build(lookup(str(tmp_path / "card")), torch.float32, torch.device("cpu"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's, raised as inductor loads
def test_a_compiled_mode_fails_rather_than_timing_eager_passes_past_its_graph_limit(monkeypatch):
    """Past its graph limit dynamo runs a function eagerly, so a -compiled profile would time eager
    passes and call them compiled: compile_model raises the limit and makes reaching it an error."""
    torch = pytest.importorskip("torch")
    from profiler import regime

    for key in ("recompile_limit", "fail_on_recompile_limit_hit"):  # restored after the test
        monkeypatch.setattr(torch._dynamo.config, key, getattr(torch._dynamo.config, key))
    monkeypatch.setattr(regime, "COMPILED_GRAPHS", 2)
    torch._dynamo.reset()
    model = regime.compile_model(torch.nn.Linear(4, 4))
    model(torch.ones(1, 4))  # a graph for one row (dynamo specialises size 1)
    model(torch.ones(3, 4))  # a graph for any other row count
    with pytest.raises(Exception, match="recompile_limit"):
        model(torch.ones(3, 4, dtype=torch.float64))  # a third graph: over the limit
    torch._dynamo.reset()


def test_corrupt_profile_is_never_half_written(tmp_path):
    from calibration.profile import save

    target = tmp_path / "p.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        save({"bad": object()}, target)  # not JSON-serialisable: the old file must survive intact
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_wake_penalty_noise_is_pooled_into_a_non_decreasing_curve():
    pytest.importorskip("torch")
    from profiler.measure import non_decreasing

    assert non_decreasing([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert non_decreasing([2.6, 0.7, 1.7, 3.9]) == pytest.approx([1.65, 1.65, 1.7, 3.9])
    assert non_decreasing([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]


def test_the_serving_heap_is_frozen_out_of_full_garbage_collections():
    """What is alive once the model is built goes to the permanent generation, so a full
    collection during a live run does not walk torch's and transformers' heap (a 150-270 ms stall)."""
    pytest.importorskip("torch")
    import gc

    from profiler.regime import freeze_heap

    heap = [{"row": [i]} for i in range(100_000)]  # 200,000 tracked objects, as a loaded library leaves
    gc.unfreeze()
    try:
        freeze_heap()
        assert gc.get_freeze_count() >= 2 * len(heap)
        assert not any(heap[0] is obj for obj in gc.get_objects())  # out of every generation's sight
    finally:
        gc.unfreeze()  # the rest of the test session collects as before


def test_the_serving_regime_serves_big_blocks_from_the_heap_and_keeps_them_when_freed():
    """A padded KV cache grows blocks past 32 MB every step, and a long batch's cache passes
    1 GB. Mapped fresh, or handed back to the kernel once freed, each pays its page faults again
    (a 16-row decode over 4,096 tokens: 300 ms against 80). In a fresh process, so no earlier
    free stretch of heap can serve the block by chance; the block is never touched, so it takes
    address space, not memory."""
    pytest.importorskip("torch")
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 33):
        pytest.skip("the allocator tuned is glibc's, read here by mallinfo2 (glibc 2.33)")
    probe = """
import ctypes, ctypes.util, torch
from profiler.regime import serving_regime
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
serving_regime(torch.device("cpu"), threads=1)
mapped = libc.mallinfo2().hblkhd
block = torch.empty(1280 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd - mapped
del block
print(mapped, libc.mallinfo2().arena >> 20)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    mapped, heap_mb = map(int, out.stdout.split()[-2:])
    assert mapped == 0  # served from the heap, not a fresh mapping
    assert heap_mb >= 1280  # freed, and kept for the next pass


def test_the_serving_regime_on_a_gpu_runs_attention_without_cudnn():
    """cuDNN builds an execution plan for every attention shape it has not run, tens of
    milliseconds each: a serving loop's cache grows a token a step and keeps paying it, and a
    grid pays it or not by what ran before. Profile and live engine both run without it."""
    torch = pytest.importorskip("torch")
    from profiler.regime import serving_regime

    before, threads = torch.backends.cuda.cudnn_sdp_enabled(), torch.get_num_threads()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        serving_regime(torch.device("cuda"), threads)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_decode_grid_measures_every_small_batch_not_only_the_fast_powers_of_two():
    pytest.importorskip("torch")
    from profiler.measure import GRIDS, decode_batches

    assert decode_batches(32) == (*range(1, 17), 24, 32)
    assert decode_batches(20) == (*range(1, 17), 20)  # the scheduler's own limit is always measured
    assert decode_batches(6) == (1, 2, 3, 4, 5, 6)
    assert GRIDS["cpu"].decode_batch == decode_batches(32)


def test_grid_times_passes_as_the_live_engine_runs_them():
    """A left-padded batch of two or more rows runs attention through a mask (another kernel path,
    another cost), so the grid times those passes masked, the mask always as wide as the cache
    plus the new token; one row is never padded. A prefill point times the lengths around its own."""
    pytest.importorskip("torch")
    import torch

    from profiler.measure import GRIDS, Bench, ModeSpec
    from profiler.models import build, lookup

    model = build(lookup("llama-tiny"), torch.float32, torch.device("cpu"))
    bench = Bench(model, torch.device("cpu"), ModeSpec.parse("fp32"), GRIDS["cpu-quick"])
    calls = []

    def spy(**inputs):
        cache = inputs.get("cache")
        calls.append((inputs["input_ids"].shape, inputs["attention_mask"], cache.get_seq_length() if cache else 0))
        return model(**inputs)

    bench.forward = spy
    for b in (1, 3):
        calls.clear()
        bench.decode(b, 16, warmup=2)
        assert len(calls) == 2 + 1  # the warm-up passes, then the timed one
        for k, (shape, mask, cached) in enumerate(calls):
            assert cached == 16 + k and shape == (b, 1)
            if b == 1:
                assert mask is None
            else:  # one padded column in one row; every row attends to the cache and its new token
                assert mask.shape == (b, cached + 1) and int((mask == 0).sum()) == 1
        calls.clear()
        for _ in range(8):  # 8 x (1 warm-up + 1 timed): 16 passes of this point, across visits
            bench.prefill(b, 20, warmup=1)
        # Live prompts take every length, so the point times each of the 16 lengths around 20 once.
        assert sorted(shape[1] for shape, _, _ in calls) == list(range(12, 28))
        for shape, mask, _ in calls:
            assert mask is None if b == 1 else (mask.shape == shape and int((mask == 0).sum()) == 1)


def test_a_sweep_spreads_each_points_passes_through_it():
    """A slow moment of the device should land on one of a point's samples, not on all of them:
    a sweep visits the grid `repeats` times and times each point once a visit. Only a point's
    first visit ever warms it up, and a point whose passes used up max_point_s in a sweep is not
    revisited in it. Validate's progress bar for a sweep is as long as the sweep moves it."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from profiler.measure import GridSamples, GridSpec, sweep_updates

    spec = GridSpec((1, 2), (16, 64), (1,), (64,), warmup=2, repeats=3, max_point_s=1.0)
    calls = []

    def prefill(b, length, warmup):
        calls.append((b, length, warmup))
        return (2.0 if (b, length) == (2, 64) else 0.01), None

    mode = SimpleNamespace(kv_cache=False, name="fp32-nocache")
    bench = SimpleNamespace(spec=spec, cuda=False, device=torch.device("cpu"), mode=mode, prefill=prefill)
    samples = GridSamples(bench, spec)
    points = [(1, 16), (2, 16), (1, 64), (2, 64)]  # a column's batches, column by column
    fast = points[:3]
    samples.sweep()
    assert calls == [(*p, 2) for p in points] + [(*p, 0) for p in fast] * 2
    calls.clear()
    bar = SimpleNamespace(n=0, set_postfix_str=lambda text: None)
    bar.update = lambda k: setattr(bar, "n", bar.n + k)
    samples.sweep(bar)
    assert calls == [(*p, 0) for p in points] + [(*p, 0) for p in fast] * 2
    assert bar.n == sweep_updates(spec, mode.kv_cache) == 12  # the bar moves past the point left out too
    assert samples.counts() == {("prefill", 0, 0): 6, ("prefill", 1, 0): 6, ("prefill", 0, 1): 6,
                                ("prefill", 1, 1): 2}


def test_after_prefill_times_decodes_after_the_prefill_has_finished_on_the_device():
    """A GPU runs a pass's kernels after the call returns: unless the prefill is synchronised
    before the first decode's clock starts, its tail is timed as that decode's excess (on a GPU,
    the rest of a 2,048-token prefill beside a decode of a few milliseconds)."""
    pytest.importorskip("torch")
    import torch

    from profiler.measure import GRIDS, Bench, ModeSpec
    from profiler.models import build, lookup

    model = build(lookup("llama-tiny"), torch.float32, torch.device("cpu"))
    bench = Bench(model, torch.device("cpu"), ModeSpec.parse("fp32"), GRIDS["cpu-quick"])
    events = []

    def forward(**inputs):
        events.append("prefill" if inputs["input_ids"].shape[1] > 1 else "decode")
        return model(**inputs)

    bench.forward, bench.sync = forward, lambda: events.append("sync")
    bench._after_prefill_excess(2, 16, [16, 32])
    prefills = [i for i, e in enumerate(events) if e == "prefill"]
    assert len(prefills) == 2 * GRIDS["cpu-quick"].after_prefill_rounds
    assert all(events[i + 1] == "sync" for i in prefills)


def test_after_prefill_keeps_the_row_counts_that_fit_in_device_memory():
    """The cuda grid times the excess up to 256 decode rows; in fp32, llama-3.1-8b's cache of 256
    rows x 1,024 tokens (64 GB) beside its weights (32 GB) does not fit in an 80 GB card. The rows
    measured before the one that ran out of memory are kept, not the profile's whole run lost; any
    other error, or a device that fits not even one row, still stops it."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from profiler.measure import GRIDS, Bench

    def bench(fits: int, error: str = "CUDA out of memory. Tried to allocate 2.00 GiB"):
        def excess(rows, context, tokens):
            if rows > fits:
                raise RuntimeError(error)
            return [[rows / 100]]
        return SimpleNamespace(spec=GRIDS["cuda"], cuda=False, device=torch.device("cpu"),
                               _after_prefill_excess=excess)

    after = Bench.after_prefill(bench(fits=16))
    assert after["rows"] == [1, 4, 16] and after["excess"] == [[[0.01]], [[0.04]], [[0.16]]]
    assert Bench.after_prefill(bench(fits=256))["rows"] == [1, 4, 16, 64, 256]
    with pytest.raises(RuntimeError, match="out of memory"):
        Bench.after_prefill(bench(fits=0))
    with pytest.raises(RuntimeError, match="shapes"):
        Bench.after_prefill(bench(fits=4, error="shapes cannot be multiplied"))


def test_prefill_points_over_the_token_cap_are_left_null_and_priced_from_their_column():
    pytest.importorskip("torch")
    import dataclasses

    import numpy as np
    import torch

    from calibration.cost_model import Surface
    from calibration.profile import Grid
    from profiler.measure import GRIDS, Bench, GridSamples, ModeSpec
    from profiler.models import build, lookup

    spec = dataclasses.replace(GRIDS["cpu-quick"], prefill_batch=(1, 2, 4), max_prefill_tokens=256)
    model = build(lookup("llama-tiny"), torch.float32, torch.device("cpu"))
    samples = GridSamples(Bench(model, torch.device("cpu"), ModeSpec.parse("fp32-nocache"), spec), spec)
    samples.sweep()
    prefill = samples.summary()["prefill"]
    assert prefill["length"] == [16, 128]
    timed = [[v is not None for v in row] for row in prefill["median_s"]]
    assert timed == [[True, True], [True, True], [True, False]]  # 4 x 128 = 512 tokens > 256
    grid = Grid(np.array(prefill["batch"], float), np.array(prefill["length"], float),
                np.array([[np.nan if v is None else v for v in row] for row in prefill["median_s"]]))
    surface = Surface(grid, quadratic=True)
    assert surface.at(4, 128) > surface.at(2, 128) > 0


def test_a_short_context_window_cuts_the_grid_with_a_point_at_its_end_and_bounds_every_pass():
    """GPT-2's 1,024 positions: the grid keeps its knots below the window and adds one at its end
    (the longest prompts are measured, not extrapolated to); the oversubscription decodes fit in
    it too (they decoded from 256 tokens, an IndexError in a thread past 276 positions)."""
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    from profiler.cli import within_window
    from profiler.measure import DTYPES, GRIDS, Bench, ModeSpec

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=1024))
    spec = within_window(GRIDS["cuda"], gpt2)
    assert spec.prefill_length == (128, 256, 512, 1012) and spec.decode_context == (128, 512, 1013)
    assert within_window(GRIDS["cpu-quick"], gpt2) == GRIDS["cpu-quick"]  # nothing to cut
    short = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=40))
    short.to(DTYPES["fp32"]).eval()
    bench = Bench(short, torch.device("cpu"), ModeSpec.parse("fp32"), within_window(GRIDS["cpu-quick"], short))
    assert bench.concurrency(2) > 0


def test_a_cpu_pass_too_big_for_memory_fails_rather_than_being_killed():
    """Linux overcommits, so without a cap a pass past the machine's memory is killed by the
    kernel mid-sweep; under the cap torch says it cannot allocate, which the grid takes as out of
    memory (the point left null). The cap holds only while a pass runs."""
    import resource

    torch = pytest.importorskip("torch")
    from profiler.measure import is_oom
    from profiler.regime import allocations_fail_past_memory

    before = resource.getrlimit(resource.RLIMIT_AS)
    with allocations_fail_past_memory(torch.device("cpu")):
        cap, _ = resource.getrlimit(resource.RLIMIT_AS)
        assert cap != resource.RLIM_INFINITY
        with pytest.raises(RuntimeError) as error:
            torch.empty(cap, dtype=torch.uint8)  # the whole cap, beside what the process holds
    assert is_oom(error.value)
    assert resource.getrlimit(resource.RLIMIT_AS) == before


def test_a_model_whose_weights_do_not_fit_is_refused_before_it_is_built(monkeypatch):
    """Linux overcommits: llama-3.1-8b in fp32 (30 GiB) on this project's 23 GiB VM was built and
    then killed by the kernel (exit 137), with no word of why. The weights are counted on the
    meta device, to the byte."""
    torch = pytest.importorskip("torch")
    from profiler import regime
    from profiler.models import MODELS, build, check_fits
    from sim.errors import InputError

    spec, cpu = MODELS["gpt2-tiny"], torch.device("cpu")
    model = build(spec, torch.float32, cpu)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    monkeypatch.setattr(regime, "available_memory", lambda device: weights)
    check_fits(spec, torch.float32, cpu)
    monkeypatch.setattr(regime, "available_memory", lambda device: weights - 1)
    check_fits(spec, torch.bfloat16, cpu)
    with pytest.raises(InputError, match=r"^gpt2-tiny: its weights take 0.03 GiB in float32, more than the 0.03 GiB "
                                         r"free on cpu$"):
        check_fits(spec, torch.float32, cpu)
