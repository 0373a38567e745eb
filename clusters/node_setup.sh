#!/usr/bin/env bash
# Runs on every lab node from `ray up`'s setup_commands (cwd: the synced ~/ray-scout).
# Installs ray-scout into a venv that also sees the system's packages (a preinstalled torch
# or ray is reused, not downloaded again) and puts that venv first on the PATH that
# `ray start` sees: the cluster launcher runs it through `bash --login -i` after
# `source ~/.bashrc`, so the PATH line goes at the end of ~/.bashrc.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RAY_SCOUT_VENV:-$HOME/.ray-scout-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
PYTHON="$VENV/bin/python" RAY_SCOUT_TEST_TOOLS=0 bash scripts/setup.sh
if [ ! -x "$VENV/bin/ray" ]; then
    # ray came from the system's site-packages, so pip left no `ray` in the venv; Ray's
    # workers run with the interpreter that ran `ray start`, which must be the venv's.
    printf '#!/bin/sh\nexec "%s" -m ray.scripts.scripts "$@"\n' "$VENV/bin/python" > "$VENV/bin/ray"
    chmod +x "$VENV/bin/ray"
fi
line="export PATH=\"$VENV/bin:\$PATH\"  # ray-scout venv (clusters/node_setup.sh)"
grep -qxF "$line" "$HOME/.bashrc" 2>/dev/null || echo "$line" >> "$HOME/.bashrc"
