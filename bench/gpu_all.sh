#!/bin/bash
# One device call: every GPU benchmark in turn, each logged; a failure does not stop the rest.
#   bash bench/gpu_all.sh            (from the repository root, on the GPU machine)
# RAY_SCOUT_CACHE must hold the embedded tokenizer (random presets borrow it).
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for job in "bench/gpu_codec.py" "bench/gpu_q2c.py" "bench/gpu_cloud.py" \
           "bench/latency_profiles.py --device cuda --lengths 128 512 1024 2048 4096 --source random:qwen2.5-3b --source random:qwen2.5-7b --source random:qwen2.5-14b --out-dir $OUT/profiles"; do
  echo "=== $job"
  python3 $job || echo "=== FAILED: $job"
done
# The device tool returns only names of letters, digits, '.', '_' and '-'.
for f in "$OUT"/profiles/*@*.yaml; do [ -e "$f" ] && mv "$f" "${f/@/_AT_}"; done
