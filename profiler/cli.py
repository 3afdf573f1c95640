"""`profile`: measure prefill and decode costs of a model on a device and write a profile.

The profile is the simulator's price list: for each optimisation mode, the time of a prefill
pass over batch x prompt length and of a decode step over batch x context, plus weights and
KV-cache bytes, peak memory, the largest batch that fits, model load time (the autoscaler's
cold start), the step time when several workers share the device, the device's measured
copy bandwidth and matmul rate, and, in each KV-cache mode, calibration floods through the live
engine (from which the cost model prices the serving loop's speed and its time outside the model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

from sim.cli_util import count, parser, run_command
from sim.errors import InputError
from sim.files import check_writable

EPILOG = """
examples:
  profile --device cpu --model gpt2-tiny --quick      a small grid in seconds, to results/profiles/ (tests use it)
  profile --device cpu --model gpt2-tiny              the shipped CPU default profile
  profile --gpu 0 --model llama-3.1-8b --modes bf16,bf16-compiled
  profile --gpu 0 --model /path/to/checkpoint --out calibration/profiles/h100-mine.json
  profile --gpu 0 --model phi-4/        a folder holding only phi-4's config.json, copied from its card

modes are <fp32|fp16|bf16>[-nocache][-compiled]: nocache recomputes the whole sequence at each
step (the seeds' FP32 baseline), compiled wraps the model in torch.compile.
"""

DEFAULT_MODES = {"cpu": "fp32-nocache,fp32", "cuda": "fp32-nocache,fp32,fp16,bf16,bf16-compiled"}


def file_path(text: str) -> Path:
    """An argparse type: the path of a file, not of a folder (`--out dir/` wrote a file named dir)."""
    if text.endswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder: give the file too, e.g. {text}name.json")
    return Path(text)


def parse_args(argv):
    from profiler.models import describe

    p = parser("profile", __doc__, EPILOG + "\nknown models:\n" + describe())
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpu", type=int, metavar="N", help="CUDA device index to profile")
    where.add_argument("--device", choices=("cpu",), help="profile on the CPU instead")
    p.add_argument("--model", default="gpt2-tiny",
                   help="a known model name, a local checkpoint folder, or a folder holding only a "
                        "config.json (random weights)")
    p.add_argument("--modes", help=f"comma-separated modes (default: {DEFAULT_MODES['cpu']} on CPU, "
                                   f"{DEFAULT_MODES['cuda']} on CUDA)")
    add_threads_argument(p)
    p.add_argument("--quick", action="store_true", help="a small grid, for tests and smoke checks")
    p.add_argument("--out", type=file_path, help="profile file (default: calibration/profiles/<device>-<model>.json; "
                                            "with --quick, results/profiles/<device>-<model>-quick.json, so a "
                                            "smoke check never replaces a shipped profile)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report beside the profile "
                   "(`report <profile.json>` draws it later)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """`--threads`, shared by `profile` and `validate`: a profile prices the engine at the thread
    count it was measured with, so both commands default to the same one."""
    p.add_argument("--threads", type=count, default=1,
                   help="CPU threads for torch (default 1: on a small machine, a second thread stalls every "
                        "pass whenever another process takes its core)")


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


def within_window(spec, model):
    """The grid cut to the model's context window (GPT-2's position table ends there), with a
    point at the window's end where the cut fell between two, so that the longest prompts a
    deployment serves are measured rather than extrapolated to."""
    from profiler.models import max_positions

    def clip(values, limit) -> tuple[int, ...]:
        kept = tuple(v for v in values if v < limit)
        return kept + (limit,) if len(kept) < len(values) else kept

    # A decode call grows its cache by its warm-up passes and its timed one; 8 positions spare.
    limit = max_positions(model) - spec.warmup - 1 - 8
    return replace(spec, prefill_length=clip(spec.prefill_length, limit - 1),
                   decode_context=clip(spec.decode_context, limit))


def measure_profile(model, model_name: str, model_load_s: float, device, info: dict, modes, spec, name: str,
                    command: str, quiet: bool = False) -> dict:
    """Measure `model` on `device` over the grid and return the profile as the file stores it."""
    from tqdm import tqdm

    from profiler.measure import grid_points, measure_modes

    spec = within_window(spec, model)
    bar = tqdm(total=grid_points(spec, modes), unit="pt", disable=quiet or not sys.stderr.isatty(), file=sys.stderr)
    measured = measure_modes(model, device, modes, spec, bar)
    bar.close()
    return profile_record(model, model_name, model_load_s, info | {"copy_bytes_per_s": measured["copy_bytes_per_s"]},
                          measured["modes"], spec, name, command)


def profile_record(model, model_name: str, model_load_s: float, info: dict, modes: dict, spec, name: str,
                   command: str) -> dict:
    """A whole profile file: metadata around the measured modes."""
    from calibration.profile import SCHEMA_VERSION

    import torch

    config = model.config.to_diff_dict() if hasattr(model.config, "to_diff_dict") else {}
    # Parameters that do matmul work for every token: not embedding lookups, and not the LM head,
    # which runs once per sequence (logits for the last position only).
    lookups = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)] + [model.get_output_embeddings()]
    skip = {id(p) for m in lookups if m is not None for p in m.parameters()}
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": info,
        "model": {"name": model_name, "params": sum(p.numel() for p in model.parameters()),
                  "matmul_params": sum(p.numel() for p in model.parameters() if id(p) not in skip),
                  "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, list))}},
        "model_load_s": model_load_s,
        "grid": dict(spec.__dict__),
        "modes": modes,
    }


def main(argv=None) -> int:
    args = parse_args(argv)

    def run() -> int:
        from profiler.models import lookup

        # An unknown model or a bad --out fails in a second, before torch loads (seconds more).
        model_spec = lookup(args.model)
        if args.out:
            check_writable(args.out)
        import torch

        from profiler.measure import DTYPES, GRIDS, ModeSpec
        from profiler.regime import freeze_heap, serving_regime

        try:
            modes = [ModeSpec.parse(m.strip()) for m in (args.modes or "").split(",") if m.strip()]
        except ValueError as e:
            raise InputError(f"--modes: {e}") from None
        # An empty list (`--modes "$MODES"` unset) measured the defaults; a mode named twice, twice.
        if args.modes is not None and not modes:
            raise InputError(f"--modes {args.modes!r}: names no mode (e.g. --modes fp32,bf16)")
        twice = next((m.name for i, m in enumerate(modes) if m in modes[:i]), None)
        if twice:
            raise InputError(f"--modes: {twice} is named twice")

        from calibration import profile as profile_file
        from calibration.cost_model import EngineOverhead, held_out_errors
        from profiler.models import build, check_fits

        device = pick_device(args)
        serving_regime(device, args.threads)
        modes = modes or [ModeSpec.parse(m) for m in DEFAULT_MODES[device.type].split(",")]
        info = device_info(device)
        # A checkpoint is named by its absolute path, which `validate` builds the live model from.
        model_name = args.model if not isinstance(model_spec, Path) else str(model_spec.resolve())
        name = f"{'cpu' if device.type == 'cpu' else slug(info['name'])}-{slug(Path(model_name).name)}"
        # A quick grid is a smoke check: it must not replace the shipped profile of the same name.
        out = args.out or (Path("results/profiles") / f"{name}-quick.json" if args.quick
                           else profile_file.SHIPPED / f"{name}.json")
        check_writable(out)  # the default path is known only now, from the device
        spec = GRIDS[device.type + ("-quick" if args.quick else "")]

        # The widest dtype: the model is built in the first mode's and converted to each mode's.
        check_fits(model_spec, max((DTYPES[m.dtype] for m in modes), key=lambda d: d.itemsize), device)
        started = time.perf_counter()
        load_start = time.perf_counter()
        model = build(model_spec, DTYPES[modes[0].dtype], device, args.quiet)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_load_s = time.perf_counter() - load_start
        freeze_heap()
        print(f"profiling {model_name} on {info['name']} ({device}), modes: {', '.join(m.name for m in modes)}",
              file=sys.stderr)
        command = "profile " + " ".join(sys.argv[1:] if argv is None else argv)
        profile = measure_profile(model, model_name, model_load_s, device, info, modes, spec, Path(out).stem,
                                  command, quiet=args.quiet)
        loaded = profile_file.parse(profile, str(out))  # never write a file we could not read back
        profile_file.save(profile, out)
        print(f"wrote {out} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        print(f"  engine overhead outside the model: {EngineOverhead.fit(loaded)}", file=sys.stderr)
        for mode in loaded.modes.values():
            errs = held_out_errors(mode)
            print(f"  {mode.name:<16} held-out error  prefill {errs['prefill']}   decode {errs['decode']}",
                  file=sys.stderr)
        if not args.no_report:
            from reports.profile_report import write_report

            html = Path(out).with_suffix(".html")
            write_report(loaded, html)
            print(f"wrote {html}", file=sys.stderr)
        return 0

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
