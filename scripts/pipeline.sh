#!/usr/bin/env bash
# The three-part fashion-mnist text-to-image pipeline on CPU, each part trained by its own command:
# the domain text encoder (400 steps, about 3 minutes), the 14x14 text-conditional generator (fashion-mnist-text-14,
# 7 minutes) and the 14 -> 28 super-resolution decoder (fashion-mnist-sr, 7 minutes; real pairs, no
# text), then assembled as runs/pipeline-demo/pipeline and run on a few prompts. About 20 minutes on
# 2 cores; an interrupted run continues where it stopped. Writes runs/pipeline-demo/generated/grid.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-dev tensorboard,ui  # (and ddpm serve, below)
DDPM=.venv/bin/ddpm
OUT=runs/pipeline-demo
if [ -f "$OUT/text-encoder/checkpoint.safetensors" ]; then  # exported once its training finished
    [ -f "$OUT/text-encoder/text-encoder.json" ] || $DDPM train-text-encoder --resume "$OUT/text-encoder"
else
    $DDPM train-text-encoder --out "$OUT/text-encoder" --steps 400
fi
MINUTES=7  # of training for each diffusion part
train() {  # train RUN PRESET [flags]: start, or continue an interrupted run for the minutes it has left
    local run=$1 preset=$2
    shift 2
    if [ -f "$run/checkpoint.safetensors" ]; then
        local left
        left=$(.venv/bin/python -c 'import sys; from ddpm.checkpoint import Checkpoint
print(round(float(sys.argv[2]) - Checkpoint(sys.argv[1]).train_state.get("train_seconds", 0) / 60, 2))' \
            "$run" "$MINUTES")
        if awk "BEGIN { exit !($left > 0.05) }"; then
            $DDPM train --resume "$run" --time-limit "$left"
        fi
    else
        $DDPM train --preset "$preset" --out "$run" --time-limit "$MINUTES" "$@"
    fi
}
train "$OUT/generator-14" fashion-mnist-text-14 --set model.text_encoder="$OUT/text-encoder"
train "$OUT/decoder-sr" fashion-mnist-sr
$DDPM pipeline "$OUT/pipeline" --generator "$OUT/generator-14" --decoder "$OUT/decoder-sr" \
    --text-encoder "$OUT/text-encoder"
# 50 network evaluations an image: the generator's 20 steps guided (40), the decoder's 10
$DDPM generate "$OUT/pipeline" --out "$OUT/generated" --num 40 --guidance 1 --seed 0 --precision bf16 \
    --sampler sde-dpm++3m --eta 3 --steps 20 --decoder-steps 10 \
    --prompt "a photo of a dark coat" --prompt "a photo of a light t-shirt/top" \
    --prompt "a photo of a large bag" --prompt "a photo of a small sneaker"
echo "pipeline: samples in $OUT/generated/grid.png (the generator's 14x14 images in low-res-grid.png)"
echo "pipeline: type your own prompts in a web page: .venv/bin/ddpm serve $OUT/pipeline (http://127.0.0.1:7860)"
