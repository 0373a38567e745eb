"""Cloud paths at Qwen2.5-7B/14B shapes: rebuild from KV and decode vs prefill vs scout.

    PYTHONPATH=. python3 bench/gpu_cloud.py --presets qwen2.5-7b qwen2.5-14b --tokens 4096
    PYTHONPATH=. python3 bench/gpu_cloud.py --device cpu --presets tiny --tokens 256   # smoke

Every path ends with the same 32 single-token forward passes (greedy argmax kept on the
device, no stop token: random weights say nothing about answer length):
``full``: the cloud prefills the whole prompt itself; ``kv:<mode>``: the edge's encoded KV
(all prompt tokens but the last, which travels as the tail) arrives in host memory as the
wire would leave it, is decoded onto the GPU and wrapped as a cache, then the tail token
and 31 more are decoded; ``scout``: the cloud re-prefills only the kept tokens (10% of the
context plus template and question) at their original positions, so attention is
restricted to them; ``scout-170``: the same at 170 kept tokens, beside Paper B's 57 ms for
a 14B scout prefill on a smaller GPU. ``rebuild`` is the KV decode + cache construction
alone (from host memory; ``rebuild dev`` from parts already on the GPU). Prints a table
last; writes gpu_cloud.json.
"""

from __future__ import annotations

import argparse

import torch

from gpu_common import (device_busy_ms, median_ms, outlier_kv, print_table, provenance,
                        shape_arguments, write_results)
from ray_scout.core.llm.prompt import synthetic_layout
from ray_scout.core.llm import generation, models
from ray_scout.core.llm.kvcodec import EncodedKV, codec_for
from ray_scout.core.modes import Mode

DECODE_STEPS = 32
SCOUT_RETENTION = 0.1
PAPER_B_SCOUT_TOKENS = 170  # Paper B: 57 ms for a 14B scout prefill at about this length


def decode_steps(lm, cache, ids: torch.Tensor, position: int, steps: int) -> torch.Tensor:
    """``steps`` greedy single-token passes from ``ids`` at ``position`` on."""
    for step in range(steps):
        out = lm.model(input_ids=ids, cache=cache, use_cache=True,
                       position_ids=torch.tensor([[position + step]], device=ids.device))
        cache = out.cache
        ids = out.logits[:, -1:].argmax(-1)
    return ids


def on_host(encoded: EncodedKV) -> EncodedKV:
    """The encoded snapshot with its buffer in host memory, as the wire delivers it."""
    encoded.check_finite()
    return EncodedKV(encoded.layout, encoded.positions, encoded.data.cpu())


def protected_for(mode: Mode, num_layers: int) -> tuple[int, ...]:
    return (0, 1, num_layers - 1) if mode == Mode.MIXED_INT4 else ()


@torch.inference_mode()
def bench_preset(preset: str, tokens: int, device: torch.device, repeats: int) -> list[dict]:
    lm = models.random_model(preset, device=device)
    facts = lm.facts
    layout = synthetic_layout(tokens, lm.model.config.vocab_size, seed=tokens)
    ids = layout.input_ids.unsqueeze(0).to(device)
    tail = ids[:, -1:]
    rows = []

    def prefill():  # the cloud's own prefill is the production one (fused on CUDA)
        return generation.prefill(lm, layout, capture="none")

    def full():
        pre = prefill()
        return decode_steps(lm, pre.snapshot.to_cache(),
                            pre.logits.argmax().view(1, 1), tokens, DECODE_STEPS)

    cache = prefill().snapshot.to_cache()

    def from_prompt(steps: int):
        extra = cache.get_seq_length() - tokens
        if extra:  # back to the prompt, so every repeat decodes the same tokens
            cache.crop(-extra)
        return decode_steps(lm, cache, tail, tokens, steps)

    def decode_only():
        return from_prompt(DECODE_STEPS)

    def one_step():
        return from_prompt(1)

    decode_ms = median_ms(decode_only, device, repeats=repeats)
    step_ms = median_ms(one_step, device, repeats=repeats)
    step_busy = device_busy_ms(one_step, device)
    del cache
    rows.append({"preset": preset, "path": "full", "tokens": tokens,
                 "prefill_ms": median_ms(prefill, device, repeats=repeats),
                 "prefill_busy_ms": device_busy_ms(prefill, device), "decode_ms": decode_ms,
                 "step_ms": step_ms, "step_busy_ms": step_busy,
                 "total_ms": median_ms(full, device, repeats=repeats)})

    # KV the edge would send: every prompt token but the tail, bf16 with outlier channels.
    snapshot = outlier_kv(facts.num_layers, facts.num_kv_heads, tokens - 1, facts.head_dim,
                          device, seed=3)
    for mode in (Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4):
        codec = codec_for(mode, protected_layers=protected_for(mode, facts.num_layers))
        on_device = codec.encode(snapshot)
        arrived = on_host(on_device)

        def rebuild(encoded=arrived, codec=codec):
            restored = codec.decode(encoded, dtype=torch.bfloat16, device=device)
            return restored.to_cache()

        def kv_path(rebuild=rebuild):
            return decode_steps(lm, rebuild(), tail, tokens - 1, DECODE_STEPS)

        rows.append({"preset": preset, "path": f"kv:{mode.value}", "tokens": tokens,
                     "payload_mb": on_device.size_bytes / 1e6,
                     "rebuild_ms": median_ms(rebuild, device, repeats=repeats),
                     "rebuild_dev_ms": median_ms(lambda: rebuild(on_device), device,
                                                 repeats=repeats),
                     "total_ms": median_ms(kv_path, device, repeats=repeats)})
    del snapshot

    kept_context = torch.arange(layout.context_span.start, layout.context_span.stop)
    kept_context = kept_context[::round(1 / SCOUT_RETENTION)]
    scout_sets = {"scout": torch.unique(torch.cat([layout.non_context_positions(), kept_context]))}
    if tokens > PAPER_B_SCOUT_TOKENS:
        wanted = PAPER_B_SCOUT_TOKENS - (layout.num_tokens - layout.num_context)
        spread = torch.linspace(layout.context_span.start, layout.context_span.stop - 1,
                                wanted).round().long()
        scout_sets["scout-170"] = torch.unique(torch.cat([layout.non_context_positions(), spread]))
    for name, kept in scout_sets.items():
        kept_ids = layout.input_ids[kept].unsqueeze(0).to(device)
        positions = kept.unsqueeze(0).to(device)

        def scout_prefill(kept_ids=kept_ids, positions=positions):
            return lm.model(input_ids=kept_ids, position_ids=positions, use_cache=True,
                            logits_to_keep=1)

        def scout_path(scout_prefill=scout_prefill):
            out = scout_prefill()
            return decode_steps(lm, out.cache, out.logits[:, -1:].argmax(-1), tokens,
                                DECODE_STEPS)

        rows.append({"preset": preset, "path": name, "tokens": int(kept.numel()),
                     "prefill_ms": median_ms(scout_prefill, device, repeats=repeats),
                     "prefill_busy_ms": device_busy_ms(scout_prefill, device),
                     "total_ms": median_ms(scout_path, device, repeats=repeats)})
    del lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(parser, presets=["qwen2.5-7b", "qwen2.5-14b"], tokens=4096, repeats=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, args.tokens, device, args.repeats)
    write_results("gpu_cloud", {**provenance(device), "decode_steps": DECODE_STEPS,
                                "rows": rows})
    print(f"cloud paths on {device}: prompt {args.tokens} tokens, {DECODE_STEPS} decoded tokens")
    print_table(rows, [("preset", "preset", "s"), ("path", "path", "s"), ("tokens", "tokens", "d"),
                       ("payload_mb", "payload MB", ".1f"), ("prefill_ms", "prefill ms", ".1f"),
                       ("prefill_busy_ms", "prefill gpu", ".1f"), ("decode_ms", "decode32 ms", ".1f"),
                       ("step_ms", "step ms", ".2f"), ("step_busy_ms", "step gpu", ".2f"),
                       ("rebuild_ms", "rebuild ms", ".2f"), ("rebuild_dev_ms", "rebuild dev", ".2f"),
                       ("total_ms", "total ms", ".1f")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
