#!/usr/bin/env bash
# Sample quality against the number of network evaluations for each sampler, on a trained run:
# 1,000 samples per setting (bf16, seed 1), domain FID / KID / classifier score against the test split.
# Usage: bash bench/sampler_quality.sh RUN_DIR [SETTINGS...]   (a setting is SAMPLER:STEPS[:ETA[:SPACING]];
# an empty ETA or SPACING, or none, is the sampler's default, e.g. sde-dpm++3m:20:3 or ancestral:20::karras)
# Prints one markdown table row per setting; the JSON results stay in RUN_DIR/quality/.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bash bench/sampler_quality.sh RUN_DIR [SAMPLER:STEPS[:ETA[:SPACING]] ...]}
shift
SETTINGS=("$@")
if [ ${#SETTINGS[@]} -eq 0 ]; then
    SETTINGS=(ancestral:50 ancestral:100 ddim:10 ddim:25 ddim:50 ddim:100 dpm++2m:10 dpm++2m:15 dpm++2m:25)
fi
echo "| sampler | steps | domain FID | KID | classifier score | seconds for 1,000 |"
echo "|---|---|---|---|---|---|"
for setting in "${SETTINGS[@]}"; do
    IFS=: read -r sampler steps eta spacing <<< "$setting"
    flags=()
    [ -n "$eta" ] && flags+=(--eta "$eta")
    [ -n "$spacing" ] && flags+=(--spacing "$spacing")
    out="$RUN/quality/$sampler-$steps-eta${eta:-default}-${spacing:-default}"
    .venv/bin/ddpm sample "$RUN" --num 1000 --batch-size 250 --seed 1 --precision bf16 \
        --sampler "$sampler" --steps "$steps" "${flags[@]}" --out "$out" --no-progress > /dev/null
    .venv/bin/ddpm eval fid "$out" --split test --no-progress > /dev/null
    .venv/bin/python - "$out" "$sampler" "$steps" <<'PY'
import json, sys
out, sampler, steps = sys.argv[1:]
r = json.load(open(f"{out}/fid-domain-fashion-mnist-cnn-v1-test.json"))
s = r["sampling"]
name = f"{sampler}, eta {s['eta']}" if "eta" in s else sampler
print(f"| {name} ({s['spacing']}) | {steps} | {r['fid']:.2f} | {r['kid']:.1f} | "
      f"{r['classifier_score']:.2f} | {s['seconds']:.0f} |")
PY
done
