"""Known architectures, built from their configs with random weights (no downloads).

A forward pass costs the same whatever the weights are, so a random-weight model measures the
real cost. Sizes are those of each model's public card. A local checkpoint folder works too, and
so does a folder holding only a model's config.json (copied from its card): random weights again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.errors import InputError, first_words


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # transformers config class: gpt2, llama, qwen2, mistral
    config: dict[str, Any]
    about: str


def _llama(layers, hidden, inter, heads, kv_heads, vocab, positions, theta, **extra):
    return dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=positions,
                rope_theta=theta, **extra)


MODELS = {m.name: m for m in [
    # Tiny models for CPU tests and demos: small vocabulary, long positions for real traces.
    ModelSpec("gpt2-tiny", "gpt2", dict(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=16384,
                                         bos_token_id=0, eos_token_id=0),
              "GPT-2 shape, 4 layers x 256, 2k vocab (CPU demos and tests)"),
    ModelSpec("llama-tiny", "llama", _llama(4, 256, 688, 4, 2, 2048, 16384, 10000.0, bos_token_id=0, eos_token_id=0),
              "Llama shape with GQA, 4 layers x 256, 2k vocab (CPU demos and tests)"),
    ModelSpec("gpt2", "gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
              "GPT-2 small, 124M"),
    ModelSpec("gpt2-medium", "gpt2", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
              "GPT-2 medium, 355M"),
    ModelSpec("llama-3.2-1b", "llama", _llama(16, 2048, 8192, 32, 8, 128256, 131072, 500000.0,
                                              tie_word_embeddings=True, head_dim=64), "Llama 3.2 1B"),
    ModelSpec("llama-3.1-8b", "llama", _llama(32, 4096, 14336, 32, 8, 128256, 131072, 500000.0), "Llama 3.1 8B"),
    ModelSpec("qwen2.5-7b", "qwen2", _llama(28, 3584, 18944, 28, 4, 152064, 32768, 1000000.0), "Qwen2.5 7B"),
    ModelSpec("mistral-7b", "mistral", _llama(32, 4096, 14336, 32, 8, 32768, 32768, 1000000.0), "Mistral 7B v0.3"),
]}


def describe() -> str:
    return "\n".join(f"  {m.name:<14} {m.about}" for m in MODELS.values())


def lookup(name: str) -> ModelSpec | Path:
    """A registry entry, or the path of a local checkpoint folder."""
    if name in MODELS:
        return MODELS[name]
    path = Path(name)
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.is_absolute():  # a profile measured on a checkpoint that is not on this machine
        raise InputError(f"model checkpoint {name!r} not found: no folder with a config.json there")
    raise InputError(f"unknown model {name!r}: not a local checkpoint folder, nor one of:\n{describe()}")


def build(spec: ModelSpec | Path, dtype, device, quiet: bool = False):
    """The model in eval mode on `device`, weights initialised there directly (fast for 8B);
    `quiet`: without transformers' own "Loading weights" bar for a checkpoint. The caller checks
    first that its weights fit (`check_fits`)."""
    import torch
    from transformers.utils import logging

    if quiet:
        logging.disable_progress_bar()

    with torch.device(device):
        model = _model(spec, dtype, load_weights=True)
    model = model.to(device).eval()
    if isinstance(spec, Path):
        _check_servable(model, spec)
    return model


def check_fits(spec: ModelSpec | Path, dtype, device) -> None:
    """Refuse, in one line, a model whose weights alone exceed what `device` has free. Building it
    would end in CUDA's out-of-memory traceback, or on a Linux CPU, which overcommits, in the
    kernel's OOM killer (exit 137) with no word of why (llama-3.1-8b in fp32, 32 GB, on this
    project's 23 GB VM). The model is counted on the meta device, which allocates nothing."""
    import torch

    from profiler.regime import available_memory

    free = available_memory(device)
    if free is None:
        return
    with torch.device("meta"):
        model = _model(spec, dtype, load_weights=False)
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if need > free:
        name = spec.name if isinstance(spec, ModelSpec) else f"model checkpoint '{spec}'"
        raise InputError(f"{name}: its weights take {need / 2**30:.2f} GiB in {str(dtype).removeprefix('torch.')}, "
                         f"more than the {free / 2**30:.2f} GiB free on {device}")


def _model(spec: ModelSpec | Path, dtype, load_weights: bool):
    """The model on torch's current device: a known model's with random weights; a checkpoint's
    with its own if it holds them and `load_weights`, else with random ones from its config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    if isinstance(spec, ModelSpec):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.family, **spec.config), dtype=dtype)
    weights = load_weights and any((spec / n).exists() for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                                                  WEIGHTS_NAME, WEIGHTS_INDEX_NAME))
    try:
        return (AutoModelForCausalLM.from_pretrained(spec, dtype=dtype) if weights
                else AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec), dtype=dtype))
    # Whatever a config transformers cannot build raises (ValueError, TypeError, huggingface_hub's
    # validation errors, torch's RuntimeError for a negative size or memory it cannot have), the
    # config is at fault.
    except Exception as e:
        raise InputError(f"model checkpoint '{spec}': cannot build a model from it: {first_words(e)}") from None


def _check_servable(model, path: Path) -> None:
    """What servesim measures and serves: a decoder with a context window and a KV cache. A
    checkpoint may hold another causal LM (BERT's head builds; a Mamba has no window)."""
    import torch

    what = f"model checkpoint '{path}': config.json: {model.config.model_type}"
    window = max_positions(model)
    if not window:
        raise InputError(f"{what} names no context window (max_position_embeddings or n_positions); "
                         "servesim measures transformer decoders with a KV cache")
    if window < MIN_WINDOW:
        raise InputError(f"{what}: a context window of {window} positions; profiling needs at "
                         f"least {MIN_WINDOW} (the calibration floods' requests)")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=model.device), use_cache=True)
    except Exception as e:  # a config that builds but cannot run (key/value heads that do not divide the heads)
        raise InputError(f"{what}: a forward pass fails: {first_words(e)}") from None
    if out.cache is None:
        raise InputError(f"{what} keeps no KV cache; servesim measures transformer decoders with one")


# The shortest context window `profile` measures in: a calibration flood's prompts are 16 tokens
# or more, with up to 31 after them (profiler.live_engine.calibration_flood). Every known model's
# window is far longer.
MIN_WINDOW = 64


def max_positions(model) -> int:
    """The model's context window (a Llama-style or GPT-2-style key); 0 where its config names none,
    which `build` refuses."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 0)
