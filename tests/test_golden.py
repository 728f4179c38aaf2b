"""Golden outputs: seeded training, every sampler, inversion, figures and the NLL bound stay bit-identical.

``golden_outputs.py`` computes them in a process of its own, pinned to one thread and to kernels that every
x86-64 machine of this decade runs the same way (ATen at AVX2, MKL's vendor-neutral branch, oneDNN off;
see that file). Unpinned, the digests belong to the machine that recorded them: two Xeons with the same
torch disagreed, and MKL pinned to its Intel-only AVX2 branch still differed on an AMD EPYC.

The reference digests in ``golden/reference.json`` were recorded by ``scripts/record_golden.sh`` from the
code of the commit they name (f099285: the code as it was at 7a0de15, where the first references came
from, and still was before the issue-21 changes) and must never be regenerated from later code. A change
that has to alter them says so in its note and records them again deliberately.

Exact equality holds for the torch version and architecture they were recorded with. Under another torch or
CPU architecture, float kernels may round differently, so the test then compares per-output sums with a
relative tolerance instead.
"""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
REFERENCE = json.loads((HERE / "golden" / "reference.json").read_text())
EXACT = REFERENCE["torch"] == torch.__version__ and REFERENCE["machine"] == platform.machine()


def run_golden(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "outputs.json"
    subprocess.run([sys.executable, str(HERE / "golden_outputs.py"), str(out), *flags], check=True)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every golden output of the current code, computed once (pinned)."""
    return run_golden(tmp_path_factory.mktemp("golden"))["outputs"]


def test_outputs_are_bit_identical_to_the_recorded_reference(outputs):
    assert set(outputs) == set(REFERENCE["outputs"])
    for name, ref in REFERENCE["outputs"].items():
        got = outputs[name]
        if EXACT:
            assert got["sha256"] == ref["sha256"], f"{name} changed (sums {got['sum']} vs {ref['sum']})"
        else:
            assert got["sum"] == pytest.approx(ref["sum"], rel=1e-3, abs=1e-4), name
            assert got["sum_abs"] == pytest.approx(ref["sum_abs"], rel=1e-3, abs=1e-4), name


@pytest.mark.skipif(not EXACT, reason="bit-exact comparison needs the recorded torch and architecture")
def test_a_one_ulp_change_to_a_weight_is_caught(tmp_path):
    """One weight of the trained model moved by one ulp: training still matches, the bound's terms do not."""
    perturbed = run_golden(tmp_path, "--perturb-ulp")["outputs"]
    reference = REFERENCE["outputs"]
    assert perturbed["train_fp32_model"]["sha256"] == reference["train_fp32_model"]["sha256"]
    assert perturbed["nll_terms"]["sha256"] != reference["nll_terms"]["sha256"]
