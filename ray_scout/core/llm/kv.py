"""KV snapshots: the per-layer keys and values of one sequence, as codecs and selection see them.

What lives here: a plain container for a (possibly pruned) KV cache of batch size one, with
the original positions of the tokens it keeps, and the two conversions to and from a
transformers cache. What it knows: shapes and positions. What it leaves to others: how the
tensors are quantized (``kvcodec``) and which positions are kept (``selection``).
"""

from __future__ import annotations

import dataclasses

import torch

from ray_scout.core.llm.models import KVFacts


class KVShapeError(ValueError):
    """A snapshot whose shapes do not agree with each other or with a model."""


@dataclasses.dataclass(frozen=True)
class KVSnapshot:
    """Keys and values per layer, each ``[kv_heads, tokens, head_dim]``.

    ``positions`` holds the original position of every kept token (int64, strictly
    increasing): keys already carry their rotary phase, so a pruned cache stays correct only
    if decoding continues at the original positions.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    positions: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise KVShapeError(f"need one key and one value tensor per layer, got "
                               f"{len(self.keys)} keys and {len(self.values)} values")
        shape = self.keys[0].shape
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.dim() != 3 or k.shape != shape or v.shape != shape:
                raise KVShapeError(f"layer {layer}: keys {tuple(k.shape)} and values "
                                   f"{tuple(v.shape)} differ from layer 0's {tuple(shape)}")
        if self.positions.dim() != 1 or self.positions.numel() != shape[1]:
            raise KVShapeError(f"{self.positions.numel()} positions for {shape[1]} tokens")
        if self.positions.numel() > 1 and not bool((self.positions.diff() > 0).all()):
            raise KVShapeError("positions must be strictly increasing")

    @classmethod
    def of_one_shape(cls, keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...],
                     positions: torch.Tensor) -> "KVSnapshot":
        """A snapshot from layers their producer made with one shape and positions already
        checked (a codec's decode: the wire or the encoder checked the positions), without
        checking them again: at 7B that check is about a third of the decode call's host
        time (issue 15)."""
        snapshot = object.__new__(cls)
        for name, value in (("keys", keys), ("values", values), ("positions", positions)):
            object.__setattr__(snapshot, name, value)
        return snapshot

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_kv_heads(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def next_position(self) -> int:
        """Where decoding continues: one past the last original position."""
        return int(self.positions[-1]) + 1 if self.num_tokens else 0

    def check_matches(self, facts: KVFacts) -> None:
        """Raise unless the shapes are those of ``facts``' model."""
        got = (self.num_layers, self.num_kv_heads, self.head_dim)
        want = (facts.num_layers, facts.num_kv_heads, facts.head_dim)
        if got != want:
            raise KVShapeError(f"KV has (layers, kv_heads, head_dim)={got} but model "
                               f"{facts.model_id} needs {want}")

    def select(self, index: torch.Tensor) -> "KVSnapshot":
        """Keep the tokens at ``index`` (indices into this snapshot, increasing)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.keys[0].device)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_tokens):
            raise IndexError(f"token index out of range [0, {self.num_tokens})")
        return KVSnapshot(
            tuple(k.index_select(1, index) for k in self.keys),
            tuple(v.index_select(1, index) for v in self.values),
            self.positions.index_select(0, index.to(self.positions.device)),
        )

    @classmethod
    def from_cache(cls, cache, positions: torch.Tensor | None = None) -> "KVSnapshot":
        """Take batch row 0 of a transformers cache (``DynamicCache``)."""
        keys = tuple(layer.keys[0] for layer in cache.layers)
        values = tuple(layer.values[0] for layer in cache.layers)
        if positions is None:
            positions = torch.arange(keys[0].shape[1])
        return cls(keys, values, positions)

    def to_cache(self):
        """A ``DynamicCache`` holding these tensors, ready to continue decoding.

        Every layer is a full ``DynamicLayer``, also where the model has sliding-window
        layers (Gemma 3): a sliding layer's cache would drop all but its window, and the
        snapshot taken after decoding would no longer have one length for every layer. The
        window is applied by the mask (``generation`` builds it from original positions
        where the cache is pruned)."""
        from transformers import DynamicCache

        return DynamicCache(
            ddp_cache_data=[(k.unsqueeze(0), v.unsqueeze(0)) for k, v in zip(self.keys, self.values)],
        )
