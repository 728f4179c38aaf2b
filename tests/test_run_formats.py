"""Run directories written by earlier code still load and draw the same images.

``fixtures/run-format-1`` is a tiny class-conditional run as ddpm wrote it on 2026-12-07 (see its README),
with the samples that code drew from it. Float kernels differ between machines, so a pixel may move by one
8-bit level; a change in how runs are read (a weight mapped wrong, a config field misread) moves them all.
"""

from pathlib import Path

import numpy as np
import pytest

from ddpm.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "run-format-1"
DRAWS = {
    "ddim_class_guided": ["--sampler", "ddim", "--class", "1", "--guidance", "1.5"],
    "ancestral_balanced": [],
}


@pytest.mark.parametrize("name", DRAWS)
def test_a_run_of_the_first_format_draws_the_images_it_drew(name, tmp_path):
    out = tmp_path / "samples"
    argv = ["sample", str(FIXTURE), "--num", "6", "--steps", "5", "--seed", "3", "--device", "cpu"]
    assert main([*argv, *DRAWS[name], "--out", str(out), "--no-progress"]) == 0
    expected = np.load(FIXTURE / "expected-samples.npz")
    with np.load(out / "samples.npz") as got:
        images, labels = got["arr_0"].astype(int), got["labels"]
    assert np.array_equal(labels, expected[f"{name}_labels"])
    difference = np.abs(images - expected[name].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.02
    assert not list(FIXTURE.glob(".*"))  # sampling writes nothing into the run
