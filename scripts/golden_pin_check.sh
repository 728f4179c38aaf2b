#!/usr/bin/env bash
# Show that the golden test's pin matters and works on this machine: the golden outputs computed unpinned
# and pinned under several thread counts and kernel caps, and how many of their digests differ from the
# first setting's. Unpinned, some differ (the digests belong to the machine); pinned, none should.
#     bash scripts/golden_pin_check.sh        (about 2 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
settings=("OMP_NUM_THREADS=1" "OMP_NUM_THREADS=2" "ATEN_CPU_CAPABILITY=avx2" "MKL_CBWR=AUTO")
for mode in unpinned pinned; do
    for i in "${!settings[@]}"; do
        flag=$([ $mode = unpinned ] && echo --unpinned || true)
        env "${settings[$i]}" .venv/bin/python tests/golden_outputs.py "$work/$mode-$i.json" $flag
    done
done
.venv/bin/python - "$work" "${settings[@]}" <<'EOF'
import json, sys
work, settings = sys.argv[1], sys.argv[2:]
for mode in ("unpinned", "pinned"):
    runs = [json.load(open(f"{work}/{mode}-{i}.json"))["outputs"] for i in range(len(settings))]
    for setting, run in zip(settings[1:], runs[1:]):
        differ = sum(run[k]["sha256"] != runs[0][k]["sha256"] for k in run)
        print(f"{mode:8s} {setting:24s} vs {settings[0]}: {differ} of {len(run)} digests differ")
EOF
