#!/usr/bin/env bash
# The main job end to end: set up, train the fashion-mnist preset on CPU (6-9 minutes on 2 cores, by CPU),
# then sample 64 images from the EMA weights with the few-step sampler that scored best at <= 50 network
# evaluations (docs/results.md). Writes runs/fashion-mnist-demo/{checkpoint.safetensors,
# samples/, metrics.jsonl} and runs/fashion-mnist-demo/final/{grid.png,images/,samples.npz}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-dev tensorboard  # (then .venv/bin/tensorboard --logdir runs/ shows it)
RUN=runs/fashion-mnist-demo
if [ -f "$RUN/checkpoint.safetensors" ]; then
    .venv/bin/ddpm train --resume "$RUN"          # continues an interrupted run; no-op if finished
else
    .venv/bin/ddpm train --preset fashion-mnist --out "$RUN" --time-limit 9.5
fi
.venv/bin/ddpm sample "$RUN" --num 64 --sampler sde-dpm++3m --eta 3 --steps 20 --seed 0 --precision auto \
    --out "$RUN/final"
echo "demo: samples in $RUN/final/grid.png; watch the run with: .venv/bin/tensorboard --logdir runs/"
