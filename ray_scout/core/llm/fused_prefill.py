"""Fused prefill of Llama/Qwen2-style decoders: what ``generation.prefill`` runs on a GPU.

What lives here: one forward pass over a prompt (batch one) written against the model's own
weights instead of its transformers modules: RMSNorm, one QKV projection and one gate+up
projection (each module's weights re-pointed into one tensor, so no memory is added and the
modules compute as before), RoPE, causal GQA attention through SDPA, SiLU·mul and the
residuals. On CUDA the pieces between the matrix products are compiled
(``torch.compile``) into a few fused kernels per layer. The last layer computes its
attention output and MLP for the last row only, the one row whose output anybody reads;
its keys, values and queries still cover every row. What it knows: the decoder layer
exactly as transformers computes it for these architectures (``supports`` says which).
What it leaves to others: the ``Prefill`` value and the plain transformers path on the CPU
(``generation``).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, with the projections that share an input fused."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    eps: float


def supports(model) -> bool:
    """Whether ``forward`` computes exactly what this model's own forward does: a Llama or
    Qwen2 decoder with SiLU MLPs without bias, full (not sliding) attention, no per-head
    query/key norms, and q/k/v biases either all present or all absent."""
    config = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    if config.model_type not in SUPPORTED_TYPES or not layers:
        return False
    if (getattr(config, "hidden_act", None) != "silu" or getattr(config, "mlp_bias", False)
            or getattr(config, "pretraining_tp", 1) != 1):
        return False
    for layer in layers:
        attn = layer.self_attn
        biases = {attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None}
        if (getattr(attn, "sliding_window", None) is not None or hasattr(attn, "q_norm")
                or attn.o_proj.bias is not None or len(biases) != 1):
            return False
    return True


def _fuse(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears that read the same input; each module's parameters
    become views into it, so the model's own forward is unchanged and no memory is added."""
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([m.weight for m in linears])
        bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
        start = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight = torch.nn.Parameter(weight[start:start + rows],
                                          requires_grad=m.weight.requires_grad)
            if bias is not None:
                m.bias = torch.nn.Parameter(bias[start:start + rows],
                                            requires_grad=m.bias.requires_grad)
            start += rows
    return weight, bias


def _fused_layer(layer) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up, _ = _fuse([mlp.gate_proj, mlp.up_proj])
    return LayerWeights(layer.input_layernorm.weight, qkv, qkv_bias, attn.o_proj.weight,
                        layer.post_attention_layernorm.weight, gate_up, mlp.down_proj.weight,
                        float(layer.input_layernorm.variance_epsilon))


_weights: "weakref.WeakKeyDictionary[torch.nn.Module, list[LayerWeights]]" = (
    weakref.WeakKeyDictionary())


def _is_current(layer, weights: LayerWeights) -> bool:
    """The modules still view the fused tensors (a ``model.to(...)`` would have moved them)."""
    return (layer.self_attn.q_proj.weight.data_ptr() == weights.qkv.data_ptr()
            and layer.mlp.gate_proj.weight.data_ptr() == weights.gate_up.data_ptr())


def layer_weights(model) -> list[LayerWeights]:
    """The fused weights of every layer, fusing them on first use (once per model)."""
    layers = model.model.layers
    cached = _weights.get(model)
    if cached is None or not all(_is_current(a, b) for a, b in zip(layers, cached)):
        cached = _weights[model] = [_fused_layer(layer) for layer in layers]
    return cached


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' Llama/Qwen2 RMSNorm: float32 statistics, then weight * x in x's dtype.
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``[tokens, heads, head_dim]`` with ``cos``/``sin`` ``[tokens, head_dim]``."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def attention_in(x, norm, qkv, qkv_bias, cos, sin, heads: int, kv_heads: int, eps: float):
    """Norm, QKV projection and RoPE of one layer: q ``[heads, T, d]`` (a view), k and v
    ``[kv_heads, T, d]`` contiguous (the snapshot's layout)."""
    tokens, head_dim = x.shape[0], cos.shape[-1]
    q, k, v = F.linear(_rms_norm(x, norm, eps), qkv, qkv_bias).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = _rope(q.view(tokens, heads, head_dim), cos, sin).transpose(0, 1)
    k = _rope(k.view(tokens, kv_heads, head_dim), cos, sin).transpose(0, 1).contiguous()
    v = v.view(tokens, kv_heads, head_dim).transpose(0, 1).contiguous()
    return q, k, v


def attention_out(x, attn, o, norm, gate_up, down, eps: float):
    """Output projection, residual, norm, SiLU MLP and residual of one layer;
    ``attn`` is the attention output ``[heads, T, d]``."""
    x = x + F.linear(attn.transpose(0, 1).reshape(x.shape[0], -1), o)
    gate, up = F.linear(_rms_norm(x, norm, eps), gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down)


_compiled: dict[str, object] = {}


def _steps(compiled: bool):
    """(attention_in, attention_out), compiled once per process when asked."""
    if not compiled:
        return attention_in, attention_out
    if not _compiled:
        _compiled["in"] = torch.compile(attention_in)
        _compiled["out"] = torch.compile(attention_out)
    return _compiled["in"], _compiled["out"]


def _mark_tokens_dynamic(*tensor_dims: tuple[torch.Tensor, int]) -> None:
    # One compiled graph for every prompt length (not one per length); a length-1 axis
    # cannot be symbolic, so the last layer's one-row MLP gets its own specialization.
    for tensor, dim in tensor_dims:
        if tensor.shape[dim] > 1:
            torch._dynamo.mark_dynamic(tensor, dim)


@dataclasses.dataclass(frozen=True)
class Output:
    """Per-layer keys and values ``[kv_heads, T, d]``, queries ``[heads, T, d]`` of the
    layers asked for (after RoPE), and the last row's logits (float32)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    queries: dict[int, torch.Tensor]
    logits: torch.Tensor


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, capture: list[int], *, compiled: bool) -> Output:
    """Prefill ``input_ids`` (1-D, on the model's device); see the module docstring."""
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D tensor, got {tuple(input_ids.shape)}")
    inner, config = model.model, model.config
    weights = layer_weights(model)
    attn0 = inner.layers[0].self_attn
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    pre, post = _steps(compiled)
    x = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.numel(), device=input_ids.device).unsqueeze(0)
    cos, sin = (t[0] for t in inner.rotary_emb(x.unsqueeze(0), positions))
    keys, values, queries = [], [], {}
    last = len(weights) - 1
    for index, w in enumerate(weights):
        if compiled:
            _mark_tokens_dynamic((x, 0), (cos, 0), (sin, 0))
        q, k, v = pre(x, w.input_norm, w.qkv, w.qkv_bias, cos, sin, heads, kv_heads, w.eps)
        keys.append(k)
        values.append(v)
        if index in capture:
            queries[index] = q
        if index == last:  # only the last row's output is read: the logits
            x, q, causal = x[-1:], q[:, -1:], False  # the last row sees every key
        else:
            causal = True
        attn = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                              is_causal=causal, scale=attn0.scaling,
                                              enable_gqa=heads != kv_heads)
        attn = attn[0]
        if compiled:
            _mark_tokens_dynamic((x, 0), (attn, 1))
        x = post(x, attn, w.o, w.post_norm, w.gate_up, w.down, w.eps)
    logits = model.lm_head(inner.norm(x))[-1].float()
    return Output(tuple(keys), tuple(values), queries, logits)
