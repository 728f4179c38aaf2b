#!/usr/bin/env bash
# Record tests/golden/reference.json from the code of one named commit, never from later code:
#     bash scripts/record_golden.sh [COMMIT]   (default: the commit the current reference names)
# It checks COMMIT out in a temporary worktree and computes the digests of that commit's src/ with this
# checkout's tests/golden_outputs.py (the harness: what it computes is unchanged since f099285, and its pin,
# one thread and vendor-neutral kernels, is the current one), so a pin made stricter gets references
# computed by the recorded code. Needs the venv of scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
reference=tests/golden/reference.json
commit="${1:-$(.venv/bin/python -c "import json; print(json.load(open('$reference'))['recorded_at_commit'])")}"
commit=$(git rev-parse --short "$commit^{commit}")
work=$(mktemp -d)
trap 'git worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach --quiet "$work/tree" "$commit"
cp tests/golden_outputs.py "$work/tree/tests/golden_outputs.py"
PYTHONPATH="$work/tree/src" .venv/bin/python "$work/tree/tests/golden_outputs.py" "$work/outputs.json"
.venv/bin/python - "$work/outputs.json" "$work/tree/src/ddpm" "$commit" "$reference" <<'EOF'
import json, sys
outputs, package, commit, reference = sys.argv[1:]
record = json.load(open(outputs))
if record["package"] != package:  # the installed package must not shadow the commit's
    sys.exit(f"record_golden: ran {record['package']}, not {package}")
keep = ("torch", "machine", "cpu_capability")
result = {"recorded_at_commit": commit, **{k: record[k] for k in keep}, "outputs": record["outputs"]}
open(reference, "w").write(json.dumps(result, indent=1) + "\n")
print(f"record_golden: {len(record['outputs'])} digests from {commit} written to {reference}")
EOF
