"""Shared fixtures. Synthetic profiles here are test doubles with made-up, exactly known costs:
they let queueing-theory formulas serve as oracles. Shipped profiles are always measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from calibration.profile import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parent.parent


def synthetic_profile(prefill=lambda b, p: 0.01, decode=lambda b, c: 0.001, memory_bytes=10**12,
                      weights_bytes=10**6, kv_bytes_per_token=1000, model_load_s=5.0, concurrency=None,
                      flood=None, wake=((0.01, 0.1), (0.0, 0.0)), after_prefill=None, model_config=None) -> dict:
    """A valid profile whose grid holds prefill(b, p) and decode(b, c) seconds, with an optional
    calibration flood section (see flood_section), after-prefill excess ((rows, tokens, excess))
    and model config (where a context window is read from)."""
    batches, lengths, contexts = [1, 2, 4, 8, 16, 32, 64], [16, 64, 256, 1024, 4096], [16, 64, 256, 1024, 4096]
    mode = {
        "dtype": "fp16", "kv_cache": True, "compiled": False,
        "weights_bytes": weights_bytes, "kv_bytes_per_token": kv_bytes_per_token,
        "prefill": {"batch": batches, "length": lengths, "median_s": [[prefill(b, p) for p in lengths] for b in batches]},
        "decode": {"batch": batches, "context": contexts, "median_s": [[decode(b, c) for c in contexts] for b in batches]},
        "wake": {"gap_s": list(wake[0]), "extra_s": list(wake[1])},
    }
    if flood:
        mode["flood"] = flood
    if after_prefill:
        rows, tokens, excess = after_prefill
        mode["after_prefill"] = {"rows": list(rows), "tokens": list(tokens), "decode_context": 256,
                                 "excess": [[list(row) for row in table] for table in excess]}
    if concurrency:
        mode["concurrency"] = {"workers": list(concurrency), "step_s": list(concurrency.values())}
    return {"schema_version": SCHEMA_VERSION, "name": "synthetic", "model_load_s": model_load_s,
            "device": {"type": "cuda", "name": "synthetic test device", "memory_bytes": memory_bytes},
            "model": {"name": "synthetic"} | ({"config": model_config} if model_config is not None else {}),
            "modes": {"fp16": mode}}


def flood_section(steps, forward_s, overhead_s) -> dict:
    """A profile's `flood` section: these scheduler Steps, run in these seconds inside the model
    and outside it."""
    keys = ("prefill_seqs", "prefill_len", "decode_seqs", "decode_context", "reshuffle_tokens")
    return {key: [getattr(s, key) for s in steps] for key in keys} | {
        "forward_s": list(forward_s), "overhead_s": list(overhead_s)}


@pytest.fixture
def write_profile(tmp_path):
    def write(**kwargs) -> Path:
        path = tmp_path / "synthetic.json"
        path.write_text(json.dumps(synthetic_profile(**kwargs)))
        return path
    return write


@pytest.fixture
def write_scenario(tmp_path):
    """Write a scenario dict as YAML; returns its path."""
    def write(data: dict, name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path
    return write


def base_scenario(profile: Path, **deployment) -> dict:
    return {
        "name": "test",
        "seed": 1,
        "workload": {
            "num_requests": 500,
            "arrivals": {"kind": "poisson", "rate": 5.0},
            "prompt_tokens": {"kind": "uniform", "low": 16, "high": 512},
            "output_tokens": {"kind": "uniform", "low": 1, "high": 64},
        },
        "deployment": {"profile": str(profile), "mode": "fp16", "replicas": 1,
                       "batching": {"policy": "continuous"}, **deployment},
    }


@pytest.fixture(scope="session")
def validation_run(tmp_path_factory):
    """One small live validation on the CPU (shared by the tests that need one): ~1 minute."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("validation") / "out"
    proc = subprocess.run([sys.executable, "-m", "calibration.validate", "scenarios/validation/steady.yaml",
                           "--requests", "40", "--loads", "0.5", "--runs", "2", "--out", str(out), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return out
