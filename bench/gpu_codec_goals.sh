#!/bin/bash
# One device call for issue 15, each step logged; a failure does not stop the rest: the GPU
# tests of the codec kernels, the codec table at 3B/7B/14B and 4K tokens (kernel and
# whole-call time against the copy floor, bare launch against a CUDA graph replay, launch
# shapes tuned at first use, code differences explained), and the cloud's rebuild rate at 7B
# for 1, 8 and 64 payloads (pinned and pageable, with the host-to-device copy floor).
#   bash bench/gpu_codec_goals.sh      (repository root, on the GPU machine)
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
grep -m1 "model name" /proc/cpuinfo; nproc
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step() { echo "=== $* ($(date -u +%H:%M:%S))"; timeout "${STEP_S:-400}" "$@" || echo "=== FAILED ($?): $*"; }
# tests/test_wire.py needs zstandard, which the device image lacks; it runs on the CPU.
step python3 -m pytest -q -p no:cacheprovider -m "not model" tests/test_kvcodec_triton.py \
  tests/test_kvcodec.py
step python3 bench/gpu_codec.py --presets qwen2.5-3b qwen2.5-7b qwen2.5-14b --tokens 4096
step python3 bench/gpu_rebuild.py --presets qwen2.5-7b --tokens 4096
echo "=== done ($(date -u +%H:%M:%S))"
