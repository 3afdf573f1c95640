"""The profile file: costs measured by `profile` on one device for one model.

A profile is JSON. Each *mode* (e.g. `fp32-nocache`, `bf16`, `bf16-compiled`) holds two timing
grids — prefill over batch x prompt length, decode over batch x context — plus memory figures,
what the first pass after an idle gap costs extra and, with a KV cache, how much slower the
decodes just after a prefill run and the steps of calibration floods through the live engine, so
a scenario can pick the mode it deploys. Grid points not measured (out of memory, or over the
grid's `max_prefill_tokens`) are null.
Beside the modes: the device's copy rate and the model's load time. The serving engine's own
cost per step outside the model is fitted from the floods (calibration.cost_model.EngineOverhead).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.errors import InputError, parse_words
from sim.fields import LARGEST, Fields, show
from sim.files import write_atomic

SCHEMA_VERSION = 6  # 3: each mode's wake penalty; 4: calibration floods; 5: engine overhead from the floods
# (and an optional after_prefill section, timed on 4 rows); 6: after_prefill timed at several row counts
SHIPPED = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class Grid:
    """Median seconds of one forward pass over a (batch, x) grid; nan where not measured."""

    batch: np.ndarray  # ascending batch sizes
    x: np.ndarray  # ascending prompt lengths (prefill) or cached contexts (decode)
    seconds: np.ndarray  # shape (len(batch), len(x))


@dataclass(frozen=True)
class Wake:
    """Extra seconds of the first pass after the device sat idle for each gap (ascending)."""

    gap_s: tuple[float, ...]
    extra_s: tuple[float, ...]


@dataclass(frozen=True)
class AfterPrefill:
    """How much slower the decode passes just after a prefill run than the same passes with none
    before them: `excess[r][i][k]` is the fraction the (k+1)-th decode of `rows[r]` rows after a
    prefill of `tokens[i]` tokens takes extra (rows and tokens ascending). Decodes past the last
    measured one run at their grid price."""

    rows: tuple[int, ...]
    tokens: tuple[float, ...]
    excess: tuple[tuple[tuple[float, ...], ...], ...]


@dataclass(frozen=True)
class Flood:
    """The steps of calibration floods through the live engine: one entry per forward pass."""

    prefill_seqs: np.ndarray
    prefill_len: np.ndarray
    decode_seqs: np.ndarray
    decode_context: np.ndarray
    reshuffle_tokens: np.ndarray  # KV tokens copied to add or drop rows (the padded cache)
    forward_s: np.ndarray  # seconds inside the model
    overhead_s: np.ndarray  # seconds the serving loop spent outside the model, copies included


@dataclass(frozen=True)
class Mode:
    name: str
    dtype: str
    kv_cache: bool
    compiled: bool
    weights_bytes: int
    kv_bytes_per_token: int
    prefill: Grid
    decode: Grid
    concurrency: dict[int, float]  # workers sharing the device -> decode step seconds
    wake: Wake
    after_prefill: AfterPrefill | None  # None without a KV cache, and in profiles measured before it
    flood: Flood | None  # None without a KV cache: the live engine needs one
    raw: dict[str, Any]


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    device_type: str
    device_name: str
    memory_bytes: int
    model_name: str
    model_load_s: float
    max_context: float  # the model's context window in tokens (inf where its config names none)
    modes: dict[str, Mode]
    raw: dict[str, Any]

    def mode(self, name: str, where: str) -> Mode:
        if name not in self.modes:
            raise InputError(f"{where}: profile {self.name!r} has no mode {name!r} "
                             f"(it has: {', '.join(self.modes)})")
        return self.modes[name]


def resolve(name_or_path: str, base: Path | None = None) -> Path:
    """A shipped profile name (`cpu-gpt2-tiny`) or a path, relative to `base` if given."""
    candidate = Path(name_or_path)
    relative = base is not None and not candidate.is_absolute()
    if relative:
        candidate = base / candidate
    if candidate.suffix == ".json" and candidate.exists():
        return candidate
    shipped = SHIPPED / f"{name_or_path}.json"
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.json")))
    where = f" (a relative path is read from {base}/)" if relative else ""
    raise InputError(f"profile {name_or_path!r} not found: not a file{where}, nor a shipped profile ({names})")


def save(profile: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, json.dumps(profile, indent=1, sort_keys=True) + "\n")


def load(path: str | Path) -> Profile:
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read profile: {e.strerror}") from None
    except ValueError as e:  # not JSON, not UTF-8, or a number past Python's 4,300 digits
        raise InputError(f"{path}: not a profile: invalid JSON ({parse_words(e)})") from None
    except RecursionError:
        raise InputError(f"{path}: not a profile: JSON nested too deeply") from None
    return parse(data, path)


def _grid(section: Fields, x_key: str) -> Grid:
    batch = section.nums("batch", positive=True, ascending=True)
    x = section.nums(x_key, positive=True, ascending=True)
    rows = section.raw("median_s")
    if not isinstance(rows, list) or len(rows) != len(batch):
        section.fail(f"expected {len(batch)} rows (one per batch size)", "median_s")
    seconds = np.full((len(batch), len(x)), np.nan)
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(x):
            section.fail(f"row {i} must have {len(x)} values (one per {x_key})", "median_s")
        for j, v in enumerate(row):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= LARGEST:
                section.fail(f"[{i}][{j}] must be a positive number of seconds (at most {LARGEST:g}) or null, "
                             f"got {show(v)}", "median_s")
            seconds[i, j] = v
    if np.isnan(seconds).all():
        section.fail("has no measured point", "median_s")
    for key in ("p10_s", "p90_s", "peak_memory_bytes", "repeats"):
        section.raw(key, None)  # measured extras, carried for reports
    section.done()
    return Grid(np.array(batch, dtype=float), np.array(x, dtype=float), seconds)


def _wake(section: Fields) -> Wake:
    gaps = section.nums("gap_s", positive=True, ascending=True)
    extra = section.nums("extra_s", low=0)
    if len(extra) != len(gaps):
        section.fail(f"expected {len(gaps)} values (one per gap)", "extra_s")
    section.done()
    return Wake(tuple(gaps), tuple(extra))


def _after_prefill(section: Fields) -> AfterPrefill:
    rows = section.nums("rows", positive=True, integer=True, ascending=True)
    tokens = section.nums("tokens", positive=True, ascending=True)
    tables = section.raw("excess")
    if not isinstance(tables, list) or len(tables) != len(rows):
        section.fail(f"expected {len(rows)} tables (one per row count)", "excess")
    width = None
    for r, table in enumerate(tables):
        if not isinstance(table, list) or len(table) != len(tokens):
            section.fail(f"table {r} must have {len(tokens)} rows (one per prefill size in tokens)", "excess")
        for i, row in enumerate(table):
            width = width or (len(row) if isinstance(row, list) else 0)
            if not (isinstance(row, list) and width and len(row) == width and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= LARGEST for v in row)):
                section.fail(f"table {r} row {i} must be fractions >= 0 (at most {LARGEST:g}), one per decode "
                             "after the prefill, as many in every row", "excess")
    section.num("decode_context", positive=True, integer=True)  # the decodes' context, timed at the grid's middle
    section.done()
    return AfterPrefill(tuple(rows), tuple(tokens),
                        tuple(tuple(tuple(float(v) for v in row) for row in table) for table in tables))


def _flood(section: Fields) -> Flood:
    columns = {key: section.nums(key, low=0) for key in Flood.__dataclass_fields__}
    steps = len(columns["forward_s"])
    for key, values in columns.items():
        if len(values) != steps:
            section.fail(f"expected {steps} values (one per step, as forward_s has)", key)
    for i in range(steps):
        if columns["forward_s"][i] <= 0:
            section.fail(f"must be > 0, got {columns['forward_s'][i]!r}", f"forward_s[{i}]")
        if not (columns["prefill_seqs"][i] and columns["prefill_len"][i]) and not (
                columns["decode_seqs"][i] and columns["decode_context"][i]):
            section.fail(f"step {i} has neither a prefill nor a decode part")
    section.done()
    return Flood(**{key: np.array(values, dtype=float) for key, values in columns.items()})


def _max_context(model: Fields) -> float:
    """The context window the model's config declares (Llama-style or GPT-2-style key)."""
    config = model.raw("config", {})
    if not isinstance(config, dict):
        model.fail("must be a mapping of the model's config", "config")
    value = config.get("max_position_embeddings") or config.get("n_positions")
    if value is None:
        return math.inf
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        model.fail(f"the context window must be a positive integer, got {show(value)}", "config")
    return value


def parse(data: Any, path: str) -> Profile:
    top = Fields(data, path)
    version = top.raw("schema_version")
    if version != SCHEMA_VERSION:
        top.fail(f"is {show(version)}; this servesim reads version {SCHEMA_VERSION} (re-run `profile`)",
                 "schema_version")
    device = top.section("device", required=True)
    model = top.section("model", required=True)
    modes_section = top.section("modes", required=True)
    modes = {}
    for name in modes_section.data:
        m = modes_section.section(name, required=True)
        conc = m.section("concurrency")
        concurrency = {}
        if conc is not None:
            workers = conc.nums("workers", positive=True)
            steps = conc.nums("step_s", positive=True)
            if len(workers) != len(steps):
                conc.fail("must have as many values as workers", "step_s")
            concurrency = {int(w): s for w, s in zip(workers, steps)}
            conc.num("context", None, positive=True)  # the shape each worker decoded
            conc.num("batch", None, positive=True)
            conc.done()
        modes[name] = Mode(
            name=name,
            dtype=m.str("dtype"),
            kv_cache=m.bool("kv_cache"),
            compiled=m.bool("compiled"),
            weights_bytes=m.num("weights_bytes", positive=True, integer=True),
            kv_bytes_per_token=m.num("kv_bytes_per_token", low=0, integer=True),
            prefill=_grid(m.section("prefill", required=True), "length"),
            decode=_grid(m.section("decode", required=True), "context"),
            concurrency=concurrency,
            wake=_wake(m.section("wake", required=True)),
            after_prefill=_after_prefill(after) if (after := m.section("after_prefill")) is not None else None,
            flood=_flood(flood) if (flood := m.section("flood")) is not None else None,
            raw=m.data,
        )
        for key in ("compile_s", "max_batch", "peak_flops", "notes", "passes_of"):
            m.raw(key, None)
        m.done()
    if not modes:
        modes_section.fail("has no mode")
    profile = Profile(
        name=top.str("name"),
        path=path,
        device_type=device.str("type", choices=("cpu", "cuda")),
        device_name=device.str("name"),
        memory_bytes=device.num("memory_bytes", positive=True, integer=True),
        model_name=model.str("name"),
        model_load_s=top.num("model_load_s", low=0),
        max_context=_max_context(model),
        modes=modes,
        raw=data,
    )
    device.num("copy_bytes_per_s", None, positive=True)  # a ceiling the report draws
    for key in ("created_at", "command", "grid", "servesim_version"):
        top.raw(key, None)
    top.done()
    return profile
