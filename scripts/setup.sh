#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with ddpm and its dev tools,
# and the Fashion-MNIST Debian package where apt is available. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# Fashion-MNIST from Debian (elsewhere torchvision downloads it on first use).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
    echo "setup: installing the dataset-fashion-mnist package"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
        || echo "setup: warning: could not install dataset-fashion-mnist; torchvision will be needed"
fi

# PyTorch: a CPU-only wheel that lies on this machine is much smaller than the default CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    cpu_wheel=$(ls /opt/wheels/torch-*+cpu-cp3*.whl 2>/dev/null | sort -V | tail -n 1 || true)
    echo "setup: installing torch ${cpu_wheel:+from $cpu_wheel}"
    "${PIP[@]}" "${cpu_wheel:-torch}"
fi
echo "setup: installing ddpm and its dev tools"
"${PIP[@]}" -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import ddpm, torch, diffusers; print('setup: ok, torch', torch.__version__)"
