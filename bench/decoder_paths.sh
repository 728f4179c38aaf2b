#!/usr/bin/env bash
# Issue 12's table: the three generation paths of the fashion-mnist text-to-image system at the same
# training budget for the diffusion parts (the fashion-mnist-text preset's 577 s, split between a
# cascade's generator and decoder, or an autoencoder and a latent generator), all with the text
# encoder in runs/text-encoder. Each path: 1,000 samples prompted "a photo of a(n) CLASS" (100 per class),
# w = 2, ancestral 50 steps (both stages), bf16, seed 1; domain FID and class agreement on the test split.
# Usage: bash bench/decoder_paths.sh [OUT]   (default runs/decoder-paths); prints markdown rows.
# AE_FLAGS / LATENT_FLAGS add --set flags to the autoencoder / latent generator (other latent shapes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/decoder-paths}
DDPM=.venv/bin/ddpm
ENC=runs/text-encoder
SPLIT=${SPLIT:-4.8 4.8}   # minutes: generator and super-resolution decoder
AE_SPLIT=${AE_SPLIT:-3.6 6.0}  # minutes: autoencoder and latent generator
read -r GEN_MIN SR_MIN <<< "$SPLIT"
read -r AE_MIN LAT_MIN <<< "$AE_SPLIT"
mkdir -p "$OUT"
[ -f "$OUT/gen-14/checkpoint.safetensors" ] || $DDPM train --preset fashion-mnist-text-14 \
    --set model.text_encoder=$ENC --out "$OUT/gen-14" --time-limit "$GEN_MIN" --no-progress
[ -f "$OUT/sr/checkpoint.safetensors" ] || $DDPM train --preset fashion-mnist-sr --out "$OUT/sr" \
    --time-limit "$SR_MIN" --set train.steps=100000 --no-progress
[ -f "$OUT/ae/reconstruction.json" ] || $DDPM train-autoencoder --out "$OUT/ae" --time-limit "$AE_MIN" \
    --set train.steps=100000 --no-progress ${AE_FLAGS:-}
[ -f "$OUT/latent/checkpoint.safetensors" ] || $DDPM train --preset fashion-mnist-latent-text \
    --set model.text_encoder=$ENC --set model.autoencoder="$OUT/ae" --out "$OUT/latent" \
    --time-limit "$LAT_MIN" --set train.steps=100000 --no-progress ${LATENT_FLAGS:-}
$DDPM pipeline "$OUT/cascade" --generator "$OUT/gen-14" --decoder "$OUT/sr" > /dev/null
$DDPM pipeline "$OUT/latent-pipe" --generator "$OUT/latent" --decoder "$OUT/ae" > /dev/null
FLAGS=(--num 1000 --batch-size 250 --seed 1 --precision bf16 --guidance 2 --sampler ancestral --steps 50
       --decoder-sampler ancestral --decoder-steps 50 --no-progress)
for path in cascade latent-pipe; do
    $DDPM generate "$OUT/$path" --out "$OUT/$path/samples" "${FLAGS[@]}" > /dev/null
    $DDPM eval fid "$OUT/$path/samples" --split test --no-progress > /dev/null
done
PIXEL=${PIXEL:-runs/fm-text}  # the fashion-mnist-text preset's run (577 s), for the pixel-space row
$DDPM sample "$PIXEL" --out "$OUT/pixel" "${FLAGS[@]:0:14}" --no-progress > /dev/null
$DDPM eval fid "$OUT/pixel" --split test --no-progress > /dev/null
.venv/bin/python - "$OUT" "$PIXEL" <<'PY'
import json, sys
from ddpm.checkpoint import Checkpoint
out, pixel = sys.argv[1:]
for path, parts in (("pixel", (pixel,)), ("cascade", ("gen-14", "sr")), ("latent-pipe", ("ae", "latent"))):
    samples = f"{out}/{path}" if path == "pixel" else f"{out}/{path}/samples"
    fid = json.load(open(f"{samples}/fid-domain-fashion-mnist-cnn-v1-test.json"))
    if path == "pixel":
        record = {"generator": json.load(open(f"{samples}/samples.json"))}
    else:
        record = json.load(open(f"{samples}/generate.json"))
    train = sum(Checkpoint(p if path == "pixel" else f"{out}/{p}").train_state["train_seconds"] for p in parts)
    sample = record["generator"]["seconds"] + record.get("decoder", {}).get("seconds", 0)
    per_image_ms = 1000 * sample / record["generator"]["num_samples"]
    print(f"| {path} | {fid['fid']:.2f} | {100 * fid['class_agreement']['overall']:.1f}% | {train:.0f} s "
          f"| {per_image_ms:.1f} ms ({sample:.0f} s for 1,000) |")
PY
cat "$OUT/ae/reconstruction.json"
