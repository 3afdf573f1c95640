"""`profile`: measure prefill and decode costs of a model on a device and write a profile.

The profile is the simulator's price list: for each optimisation mode, the time of a prefill
pass over batch x prompt length and of a decode step over batch x context, plus weights and
KV-cache bytes, peak memory, the largest batch that fits, model load time (the autoscaler's
cold start), the step time when several workers share the device, and the device's measured
copy bandwidth and matmul rate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
import time
from pathlib import Path

from sim.cli_util import run_command
from sim.errors import InputError

EPILOG = """
examples:
  profile --device cpu --model gpt2-tiny --quick      a small grid, seconds (tests use this)
  profile --device cpu --model gpt2-tiny              the shipped CPU default profile
  profile --gpu 0 --model llama-3.1-8b --modes bf16,bf16-compiled
  profile --gpu 0 --model /path/to/checkpoint --out calibration/profiles/h100-mine.json

modes are <fp32|fp16|bf16>[-nocache][-compiled]: nocache recomputes the whole sequence at each
step (the seeds' FP32 baseline), compiled wraps the model in torch.compile.
"""

DEFAULT_MODES = {"cpu": "fp32-nocache,fp32", "cuda": "fp32-nocache,fp32,fp16,bf16,bf16-compiled"}


def parse_args(argv):
    from profiler.models import describe

    p = argparse.ArgumentParser(prog="profile", description=__doc__.split(":", 1)[1].strip(),
                                epilog=EPILOG + "\nknown models:\n" + describe(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=int, metavar="N", help="CUDA device index to profile")
    where.add_argument("--device", choices=("cpu",), help="profile on the CPU instead")
    p.add_argument("--model", default="gpt2-tiny", help="a known model name or a local checkpoint folder")
    p.add_argument("--modes", help=f"comma-separated modes (default: {DEFAULT_MODES['cpu']} on CPU, "
                                   f"{DEFAULT_MODES['cuda']} on CUDA)")
    p.add_argument("--quick", action="store_true", help="a small grid, for tests and smoke checks")
    p.add_argument("--out", type=Path, help="profile file (default: calibration/profiles/<device>-<model>.json)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report beside the profile")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower().replace("nvidia", "")).strip("-")


def pick_device(args):
    import torch

    if args.gpu is None:
        if args.device != "cpu" and torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"--gpu {args.gpu}: no CUDA device here (torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if not 0 <= args.gpu < count:
        raise InputError(f"--gpu {args.gpu}: this machine has {count} CUDA device(s) (0..{count - 1})")
    return torch.device("cuda", args.gpu)


def device_info(device) -> dict:
    import torch
    import transformers

    info = {"type": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": None, "driver": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=props.total_memory, cuda=torch.version.cuda,
                    multiprocessors=props.multi_processor_count)
        try:
            import subprocess

            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info.update(name=name, memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    threads=torch.get_num_threads())
    return info


def clip(values, limit) -> tuple[int, ...]:
    kept = tuple(v for v in values if v <= limit)
    return kept or (min(values[0], limit),)


def measure_mode(bench, spec, bar) -> dict:
    """Both grids of one mode. A point that runs out of memory is null, and so are the larger
    batches at the same length (they would too)."""
    from profiler.measure import is_oom

    import torch

    out = {}
    nocache = not bench.mode.kv_cache
    for kind, batches, xs, fn in (
        ("prefill", spec.prefill_batch, spec.prefill_length, bench.prefill),
        # Without a cache a decode step is a prefill-shaped pass, so it shares prefill's grid.
        ("decode", spec.prefill_batch if nocache else spec.decode_batch,
         spec.prefill_length if nocache else spec.decode_context, bench.decode),
    ):
        cells = {k: [[None] * len(xs) for _ in batches] for k in ("median_s", "p10_s", "p90_s", "peak_memory_bytes", "repeats")}
        for j, x in enumerate(xs):
            oom = False
            for i, b in enumerate(batches):
                bar.set_postfix_str(f"{bench.mode.name} {kind} b={b} {'ctx' if kind == 'decode' else 'len'}={x}")
                if not oom:
                    try:
                        point = fn(b, x)
                        for k in cells:
                            cells[k][i][j] = point[k]
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                        if not is_oom(e):
                            raise
                        oom = True
                        if bench.cuda:
                            torch.cuda.empty_cache()
                bar.update(1)
        out[kind] = {"batch": list(batches), "length" if kind == "prefill" else "context": list(xs), **cells}
    return out


def max_batch(bench, context: int, start: int) -> dict | None:
    """Largest decode batch (doubling from `start`) whose KV cache of `context` tokens fits."""
    from profiler.measure import is_oom

    import torch

    if not bench.cuda or not bench.mode.kv_cache:
        return None
    fits, b = None, start
    while b <= 65536:
        try:
            with torch.inference_mode():
                cache = bench.synthetic_cache(b, context)
                bench.forward(input_ids=bench._ids(b, 1), past_key_values=cache, use_cache=True)
            del cache
            fits = b
            b *= 2
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            break
        finally:
            torch.cuda.empty_cache()
    return {"context": context, "batch": fits}


def main(argv=None) -> int:
    args = parse_args(argv)

    def run() -> int:
        from profiler.measure import GRIDS, ModeSpec

        try:
            modes = [ModeSpec.parse(m.strip()) for m in (args.modes or "").split(",") if m.strip()]
        except ValueError as e:
            raise InputError(f"--modes: {e}") from None
        from profiler.models import lookup

        model_spec = lookup(args.model)  # fail fast on an unknown model, before importing torch
        import torch
        from tqdm import tqdm

        from calibration import profile as profile_file
        from calibration.cost_model import held_out_errors
        from profiler.measure import Bench, device_peaks
        from profiler.models import build, max_positions

        device = pick_device(args)
        modes = modes or [ModeSpec.parse(m) for m in DEFAULT_MODES[device.type].split(",")]
        info = device_info(device)
        model_name = args.model if not isinstance(model_spec, Path) else model_spec.name
        name = f"{'cpu' if device.type == 'cpu' else slug(info['name'])}-{slug(model_name)}"
        out = args.out or profile_file.SHIPPED / f"{name}.json"
        spec = GRIDS[device.type + ("-quick" if args.quick else "")]

        started = time.perf_counter()
        load_start = time.perf_counter()
        model = build(model_spec, torch.float32 if modes[0].dtype == "fp32" else
                      {"fp16": torch.float16, "bf16": torch.bfloat16}[modes[0].dtype], device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_load_s = time.perf_counter() - load_start
        limit = max_positions(model) - spec.warmup - spec.repeats - 8
        spec = type(spec)(**{**spec.__dict__,
                             "prefill_length": clip(spec.prefill_length, limit - 1),
                             "decode_context": clip(spec.decode_context, limit)})
        print(f"profiling {model_name} on {info['name']} ({device}), modes: {', '.join(m.name for m in modes)}",
              file=sys.stderr)
        peaks = device_peaks(device, sorted({m.dtype for m in modes}))
        points = sum(len(spec.prefill_batch) * len(spec.prefill_length) * (1 if m.kv_cache else 2)
                     + (len(spec.decode_batch) * len(spec.decode_context) if m.kv_cache else 0) for m in modes)
        points += len(spec.concurrency_workers) * len(modes)
        bar = tqdm(total=points, unit="pt", disable=args.quiet, file=sys.stderr)
        profile_modes = {}
        for mode in modes:
            model = model.to(dtype=getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[mode.dtype]))
            compile_start = time.perf_counter()
            bench = Bench(model, device, mode, spec)
            measured = measure_mode(bench, spec, bar)
            conc = []
            for k in spec.concurrency_workers:
                bar.set_postfix_str(f"{mode.name} {k} workers sharing the device")
                conc.append(bench.concurrency(k))
                bar.update(1)
            profile_modes[mode.name] = {
                "dtype": mode.dtype, "kv_cache": mode.kv_cache, "compiled": mode.compiled,
                "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "kv_bytes_per_token": bench.kv_bytes_per_token(),
                "compile_s": time.perf_counter() - compile_start if mode.compiled else None,
                "peak_flops": peaks["matmul_flops"].get(mode.dtype),
                "max_batch": max_batch(bench, spec.decode_context[-1], spec.decode_batch[-1]),
                "concurrency": {"workers": list(spec.concurrency_workers), "step_s": conc,
                                "context": 256, "batch": 1},
                **measured,
            }
        bar.close()
        info["copy_bytes_per_s"] = peaks["copy_bytes_per_s"]
        config = model.config.to_diff_dict() if hasattr(model.config, "to_diff_dict") else {}
        profile = {
            "schema_version": profile_file.SCHEMA_VERSION,
            "name": Path(out).stem,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "profile " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": info,
            "model": {"name": model_name, "params": sum(p.numel() for p in model.parameters()),
                      "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, list))}},
            "model_load_s": model_load_s,
            "grid": {k: v for k, v in spec.__dict__.items()},
            "modes": profile_modes,
        }
        loaded = profile_file.parse(profile, str(out))  # never write a file we could not read back
        profile_file.save(profile, out)
        print(f"wrote {out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for mode in loaded.modes.values():
            errs = held_out_errors(mode)
            print(f"  {mode.name:<16} held-out error  prefill median {errs['prefill'].median:.1%} "
                  f"max {errs['prefill'].max:.1%}   decode median {errs['decode'].median:.1%} "
                  f"max {errs['decode'].max:.1%}", file=sys.stderr)
        if not args.no_report:
            from reports.profile_report import write_report

            html = Path(out).with_suffix(".html")
            write_report(loaded, html)
            print(f"wrote {html}", file=sys.stderr)
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
