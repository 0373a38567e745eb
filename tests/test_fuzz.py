"""Fuzzing every decoder that reads bytes from the network or a user: only documented errors,
no input over 1 s, resident memory flat.

A seeded mutator (byte flips, boundary integers at random offsets, cuts, splices, inserts,
with the checksums recomputed half of the time so the field checks behind them are reached)
runs over valid seeds of each format. The default suite runs a quick pass; the `long`
marked test runs >= 10,000 inputs per decoder (CI runs every test, the long ones included;
docs/RELIABILITY.md has the counts and the time they take).
"""

from __future__ import annotations

import io
import math
import random
import struct
import time
import zlib
from typing import Callable

import pytest
import torch
import yaml

from ray_scout.core.llm import wire
from ray_scout.core.llm.kv import KVSnapshot
from ray_scout.core.llm.kvcodec import codec_for
from ray_scout.core.llm.models import KVFacts
from ray_scout.core.llm.scout import (
    DocumentMissing, ScoutFormatError, ScoutPayload, decode_indices, document_hash,
    encode_indices,
)
from ray_scout.core.modes import Mode
from ray_scout.experiments.spec import REPO_ROOT, SpecError, parse_spec, parse_spec_text
from ray_scout.transport import framing
from resident import MIB, peak_rss_bytes, reset_peak

FACTS = KVFacts("fuzz/model", num_layers=3, num_kv_heads=2, head_dim=16, num_attention_heads=4)
BOUNDARY = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**40,
            2**63 - 1, 2**63, 2**64 - 1]
TIME_LIMIT_S = 1.0
# Peak resident growth over a whole run (the kernel's high-water mark, so one input's
# transient buffer counts as much as a leak of one allocation per input).
RSS_GROWTH_BOUND = 64 * MIB


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:  # flip bits of one byte
            data[min(at, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # any byte value
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op == 2:  # a boundary integer of 1, 2, 4 or 8 bytes, either byte order
            size = rng.choice((1, 2, 4, 8))
            value = rng.choice(BOUNDARY) & ((1 << 8 * size) - 1)
            data[at:at + size] = value.to_bytes(size, rng.choice(("little", "big")))
        elif op == 3:  # cut
            del data[at:at + rng.randint(1, 64)]
        elif op == 4:  # truncate
            del data[at:]
        elif op == 5:  # insert garbage
            data[at:at] = rng.randbytes(rng.randint(1, 32))
        elif op == 6:  # splice another seed's tail
            other = rng.choice(seeds)
            data[at:] = other[rng.randrange(len(other) + 1):]
        else:  # repeat a chunk
            data[at:at] = data[at:at + rng.randint(1, 64)] * rng.randint(1, 8)
    return bytes(data)


def fuzz(decode: Callable[[bytes], object], seeds: list[bytes], errors: tuple[type, ...],
         count: int, seed: int, reseal: Callable[[bytes], bytes] | None = None) -> dict:
    """Feed ``count`` mutants of ``seeds`` to ``decode``; return the run's figures."""
    rng = random.Random(seed)
    slowest_s, rejected = 0.0, 0
    rss_start = reset_peak()
    for i in range(count):
        data = mutate(rng, seeds)
        if reseal is not None and rng.random() < 0.5:
            data = reseal(data)
        started = time.perf_counter()
        try:
            decode(data)
        except errors:
            rejected += 1
        except BaseException as exc:  # an undocumented error: show the input that caused it
            pytest.fail(f"input {i} (seed {seed}) raised {type(exc).__name__}: {exc}\n"
                        f"input: {data[:400].hex()}")
        elapsed = time.perf_counter() - started
        assert elapsed < TIME_LIMIT_S, f"input {i} took {elapsed:.2f} s: {data[:400].hex()}"
        slowest_s = max(slowest_s, elapsed)
    rss_peak = peak_rss_bytes()
    assert rss_peak - rss_start < RSS_GROWTH_BOUND, f"RSS grew by {(rss_peak - rss_start) / MIB:.0f} MiB"
    return {"inputs": count, "rejected": rejected, "slowest_s": slowest_s,
            "rss_growth_mib": (rss_peak - rss_start) / MIB}


# --- seeds and decoders ---------------------------------------------------------------------
def kv_seeds() -> list[bytes]:
    gen = torch.Generator().manual_seed(0)
    shape = (FACTS.num_kv_heads, 9, FACTS.head_dim)
    snap = KVSnapshot(tuple(torch.randn(*shape, generator=gen) for _ in range(3)),
                      tuple(torch.randn(*shape, generator=gen) for _ in range(3)),
                      torch.arange(9) * 3)
    out = []
    for mode, protected in ((Mode.BF16, ()), (Mode.INT8, ()), (Mode.INT4, ()), (Mode.MIXED_INT4, (1,))):
        encoded = codec_for(mode, group_size=8, protected_layers=protected).encode(snap)
        for compress in (False, True):
            out.append(wire.encode_kv(encoded, FACTS.model_id, tail_ids=(1, 2, 3), compress=compress))
    return out


def wire_reseal(data: bytes) -> bytes:
    body = data[:-4] if len(data) >= 4 else data
    return body + struct.pack("<I", zlib.crc32(body))


def decode_kv(data: bytes) -> None:
    wire.decode_kv(data, facts=FACTS, max_bytes=1 << 20)


INDEX_CONTEXT = 300


def index_seeds() -> list[bytes]:
    return [encode_indices([], INDEX_CONTEXT), encode_indices([0, 5, 299], INDEX_CONTEXT),
            encode_indices(list(range(0, INDEX_CONTEXT, 2)), INDEX_CONTEXT),
            encode_indices(list(range(INDEX_CONTEXT)), INDEX_CONTEXT)]


def decode_index_code(data: bytes) -> None:
    decode_indices(data, INDEX_CONTEXT)


def scout_seeds() -> list[bytes]:
    import zstandard

    text = "The vault opens at dawn. The code word is amberline. " * 4
    document = zstandard.ZstdCompressor().compress(text.encode())
    out = []
    for positions, with_document in (((1, 4, 9), True), ((), False), (tuple(range(0, 40, 2)), True)):
        spans = tuple((p * 3, p * 3 + 2) for p in positions)
        out.append(ScoutPayload(document_hash(text), "Which word?", 40, positions, spans,
                                document if with_document else None).to_bytes())
    return out


def decode_scout(data: bytes) -> None:
    payload = ScoutPayload.from_bytes(data)
    if payload.document_zstd is not None:
        payload.document()


def frame_seeds() -> list[bytes]:
    return [framing.encode_frame(framing.MessageType.REQUEST, 7, b"payload" * 20, deadline_ms=900),
            framing.encode_frame(framing.MessageType.HELLO, 0, b"t" * 32),
            framing.encode_frame(framing.MessageType.CANCEL, 3)
            + framing.encode_frame(framing.MessageType.RESPONSE, 3, b"ok", body_crc=False),
            framing.encode_frame(framing.MessageType.ERROR, 0,
                                 framing.encode_error_body(framing.ErrorCode.BUSY, "full"))]


def frame_reseal(data: bytes) -> bytes:
    if len(data) < framing.HEADER_SIZE:
        return data
    head = data[:framing.HEADER.size]
    return head + framing.HEADER_CRC.pack(zlib.crc32(head)) + data[framing.HEADER_SIZE:]


def read_frames(data: bytes) -> None:
    stream = io.BytesIO(data)
    while (received := framing.read_frame(stream.readinto, max_body_bytes=1 << 16)) is not None:
        if received.frame.header.msg_type is framing.MessageType.ERROR:
            framing.decode_error_body(bytes(received.frame.body))


def spec_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted((REPO_ROOT / "experiments").glob("*.yaml"))]


def load_spec_bytes(data: bytes) -> None:
    parse_spec_text(data.decode("utf-8", "replace"), "fuzzed spec", "simulated")


# Values a structured mutation puts in place of a spec field: wrong types, extremes, NaN.
ODD_VALUES = [None, -1, 0, 1e308, float("nan"), float("inf"), 2**70, "", "x", "0kbit",
              "99999gbit", [], {}, [None], {"a": 1}, True, "1e9", -0.0]


def mutate_spec_tree(rng: random.Random, doc: dict) -> dict:
    """``doc`` (a parsed shipped spec, changed in place) with 1-3 values made odd."""
    for _ in range(rng.randint(1, 3)):
        node = doc
        while True:  # walk to a random leaf or branch
            keys = list(node) if isinstance(node, dict) else list(range(len(node))) \
                if isinstance(node, list) else []
            if not keys or rng.random() < 0.3:
                break
            key = rng.choice(keys)
            if not isinstance(node[key], (dict, list)) or rng.random() < 0.3:
                node[key] = rng.choice(ODD_VALUES)
                break
            node = node[key]
    return doc


DECODERS = {
    "wire.decode_kv": (decode_kv, kv_seeds, (wire.WireError,), wire_reseal),
    "scout.decode_indices": (decode_index_code, index_seeds, (ScoutFormatError,), None),
    "ScoutPayload.from_bytes": (decode_scout, scout_seeds, (ScoutFormatError, DocumentMissing), None),
    "framing.read_frame": (read_frames, frame_seeds, (framing.FrameError,), frame_reseal),
    "spec loader (text)": (load_spec_bytes, spec_seeds, (SpecError,), None),
}


def fuzz_spec_tree(count: int, seed: int) -> dict:
    """Structured mutations of the shipped specs (odd values at random keys) straight into
    ``parse_spec``: the YAML layer is the text fuzzer's; this one reaches every field check."""
    import copy

    rng = random.Random(seed)
    docs = [yaml.safe_load(text) for text in spec_seeds()]
    mutants = iter([mutate_spec_tree(rng, copy.deepcopy(rng.choice(docs))) for _ in range(count)])
    # fuzz() draws one input per call; the mutants are the inputs, in order.
    return fuzz(lambda _: parse_spec(next(mutants), fidelity="simulated"), [b"-"], (SpecError,),
                count, seed)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_quick_fuzz_raises_only_documented_errors(name):
    decode, seeds, errors, reseal = DECODERS[name]
    fuzz(decode, seeds(), errors, 500 if "spec" not in name else 150, seed=1, reseal=reseal)


def test_quick_fuzz_of_spec_values_raises_only_spec_errors():
    fuzz_spec_tree(150, seed=1)


LONG_INPUTS = 10_000


@pytest.mark.long
@pytest.mark.parametrize("name", sorted(DECODERS) + ["spec loader (values)"])
def test_long_fuzz_10000_inputs_per_decoder(name, record_property):
    started = time.perf_counter()
    if name == "spec loader (values)":
        figures = fuzz_spec_tree(LONG_INPUTS, seed=17)
    else:
        decode, seeds, errors, reseal = DECODERS[name]
        figures = fuzz(decode, seeds(), errors, LONG_INPUTS, seed=17, reseal=reseal)
    figures["wall_s"] = time.perf_counter() - started
    for key, value in figures.items():
        record_property(key, value)
    print(f"\nfuzz {name}: {figures}")
    assert figures["inputs"] == LONG_INPUTS and math.isfinite(figures["slowest_s"])
