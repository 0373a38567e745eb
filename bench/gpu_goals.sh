#!/bin/bash
# One device call for issue 6's two open goals, each step logged; a failure does not stop
# the rest: the GPU tests of the codec kernels and the fused prefill, the codec
# table, the prefill's breakdown by kernel class, and Q2C vs eager attention (also
# with cuDNN's avoid-recompile switch).
#   RAY_SCOUT_CACHE=... bash bench/gpu_goals.sh      (repository root, on the GPU machine)
# RAY_SCOUT_CACHE must hold the embedded tokenizer (random presets borrow it);
# Q2C_LENGTHS overrides the prompt lengths of bench/gpu_q2c.py.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step() { echo "=== $* ($(date -u +%H:%M:%S))"; timeout "${STEP_S:-400}" "$@" || echo "=== FAILED ($?): $*"; }
step python3 -m pytest -q -p no:cacheprovider tests/test_kvcodec_triton.py tests/test_fused_prefill.py tests/test_kvcodec.py
step python3 bench/gpu_codec.py --presets qwen2.5-7b qwen2.5-14b
step python3 bench/gpu_prefill.py
step python3 bench/gpu_q2c.py --lengths ${Q2C_LENGTHS:-512 2048 4096 8192}
# cuDNN's SDPA builds a plan per sequence length (first call at a new length: 0.1 to 0.9 s);
# torch's opt-in ragged path is meant to reuse one plan across lengths.
step env TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 bench/gpu_q2c.py --lengths 2048 4096 \
  --out-name gpu_q2c_avoid_recompile
echo "=== done ($(date -u +%H:%M:%S))"
