#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with ddpm (and, unless --no-dev,
# its dev tools: pytest, ruff, diffusers, tensorboard, gradio, selenium), the Fashion-MNIST Debian package
# where apt is available, and (dev) Debian's chromium for the browser test.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
# `--no-dev [EXTRA,...]`: ddpm without the dev tools, with those extras (e.g. tensorboard,ui)
EXTRAS="[dev]"
if [ "${1:-}" = "--no-dev" ]; then EXTRAS="${2:+[$2]}"; fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() {  # quiet unless it fails; then the whole pip log is shown
    if ! .venv/bin/python -m pip install --disable-pip-version-check "$@" > .venv/pip.log 2>&1; then
        cat .venv/pip.log
        echo "setup: pip install $* failed" >&2
        exit 1
    fi
}

# Fashion-MNIST from Debian (elsewhere torchvision downloads it on first use).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
    echo "setup: installing the dataset-fashion-mnist package"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
        || echo "setup: warning: could not install dataset-fashion-mnist; torchvision will be needed"
fi

# Chromium and its driver for the test of `ddpm serve`'s page in a real browser (dev set-up only).
if [ "$EXTRAS" = "[dev]" ] && ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium and chromium-driver (for the web page's browser test)"
    (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
        || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)) \
        || echo "setup: warning: could not install chromium; the browser test will be skipped"
fi

# PyTorch: a CPU-only wheel that lies on this machine is much smaller than the default CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    tag=$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    cpu_wheel=$(ls /opt/wheels/torch-*+cpu-"$tag"-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
    echo "setup: installing torch ${cpu_wheel:+from $cpu_wheel}"
    pip_install "${cpu_wheel:-torch}"
fi
echo "setup: installing ddpm${EXTRAS:+ with $EXTRAS}"
pip_install -e ".$EXTRAS"
# torch-fidelity (Inception FID/IS) declares torchvision, which has no build matching the local CPU torch and would
# pull a CUDA torch; its Inception network needs none of it, so it is installed without dependencies.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('torch_fidelity'))"; then
    pip_install --no-deps "torch-fidelity>=0.3"
fi
.venv/bin/python -c "import ddpm, torch; print('setup: ok, torch', torch.__version__)"
