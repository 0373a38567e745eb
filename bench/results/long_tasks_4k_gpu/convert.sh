# On the device, after the wheels and the three parts are in /tmp/rs: assemble, check,
# convert with ray_scout's own conversion, keep this machine's tokenizer/config, digest.
set -e
cp .device/smol.part02 /tmp/rs/
cat /tmp/rs/smol.part00 /tmp/rs/smol.part01 /tmp/rs/smol.part02 > /tmp/rs/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cut -d' ' -f1 .device/smol.sha256)  /tmp/rs/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
export PYTHONPATH=/tmp/rs/site:$PWD
python3 -c "import transformers, gguf, zstandard; print('transformers', transformers.__version__)"
python3 -c "
from pathlib import Path
from ray_scout.core.llm.models import convert_gguf
convert_gguf(Path('/tmp/rs/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('/tmp/rs/cache/smollm2-135m-instruct'))"
cp .device/smol_meta/* /tmp/rs/cache/smollm2-135m-instruct/
python3 .device/digest.py /tmp/rs/cache/smollm2-135m-instruct/model.safetensors
