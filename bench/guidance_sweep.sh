#!/usr/bin/env bash
# Domain FID and class agreement against the guidance scale w on a class- or text-conditional
# Fashion-MNIST run: 1,000 class-balanced samples per w (a text run's prompts: "a photo of a(n) CLASS"),
# ancestral, 50 steps, bf16, seed 1, scored against the test split.
# Usage: bash bench/guidance_sweep.sh RUN_DIR [W ...]   (default w: 0 0.5 1 2 4)
# FLAGS="--guidance-rescale 0.7" TAG=r0.7 bash bench/guidance_sweep.sh ...  adds sampling flags (the
# samples then go to RUN_DIR/guidance/wW-TAG).
# Prints one markdown table row per w and writes RUN_DIR/guidance/guidance[-TAG].png (both curves).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bash bench/guidance_sweep.sh RUN_DIR [W ...]}
shift
SCALES=("$@")
if [ ${#SCALES[@]} -eq 0 ]; then
    SCALES=(0 0.5 1 2 4)
fi
echo "| w | domain FID | KID | class agreement | lowest class (agreement) | seconds for 1,000 |"
echo "|---|---|---|---|---|---|"
for w in "${SCALES[@]}"; do
    out="$RUN/guidance/w$w${TAG:+-$TAG}"
    # shellcheck disable=SC2086  # FLAGS is a list of flags
    .venv/bin/ddpm sample "$RUN" --num 1000 --batch-size 250 --seed 1 --precision bf16 \
        --steps 50 --guidance "$w" --out "$out" --no-progress ${FLAGS:-} > /dev/null
    .venv/bin/ddpm eval fid "$out" --split test --no-progress > /dev/null
    .venv/bin/python - "$out" "$w" <<'PY'
import json, sys
out, w = sys.argv[1:]
r = json.load(open(f"{out}/fid-domain-fashion-mnist-cnn-v1-test.json"))
a = r["class_agreement"]
low = min(a["per_class"].items(), key=lambda kv: kv[1]["agreement"])
print(f"| {w} | {r['fid']:.2f} | {r['kid']:.1f} | {100 * a['overall']:.1f}% | {low[0]} ({100 * low[1]['agreement']:.0f}%) "
      f"| {r['sampling']['seconds']:.0f} |")
PY
done
.venv/bin/python - "$RUN" "${TAG:+-$TAG}" "${SCALES[@]}" <<'PY'
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
run, tag, scales = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [json.load(open(f"{run}/guidance/w{w}{tag}/fid-domain-fashion-mnist-cnn-v1-test.json")) for w in scales]
ws = [float(w) for w in scales]
fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
ax.plot(ws, [r["fid"] for r in rows], "o-", color="tab:blue")
ax.set_xlabel("guidance scale w (Ho and Salimans; 0 = conditional)")
ax.set_ylabel("domain FID (1,000 samples)", color="tab:blue")
right = ax.twinx()
right.plot(ws, [100 * r["class_agreement"]["overall"] for r in rows], "s--", color="tab:red")
accuracy = 100 * rows[0]["extractor_test_accuracy"]
right.axhline(accuracy, color="tab:red", lw=0.8, ls=":")
right.annotate("real test images", (ws[0], accuracy), (0, 3), textcoords="offset points", color="tab:red")
right.set_ylabel("class agreement (%)", color="tab:red")
fig.tight_layout()
fig.savefig(f"{run}/guidance/guidance{tag}.png")
PY
echo "plot: $RUN/guidance/guidance${TAG:+-$TAG}.png"
