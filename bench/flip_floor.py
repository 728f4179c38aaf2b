"""What horizontal flips cost on Fashion-MNIST's domain FID: real test images, none / half / all of them
mirrored, scored against the test split as `ddpm eval fid` scores samples. Its shoes all face left, so a
model trained with random flips (half its shoes face right) cannot score below the half-flipped row.

    python bench/flip_floor.py OUT [--num 5000]

Writes OUT/{plain,half,all}.npz and their eval results; prints one line each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from ddpm.data import load_idx_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=5000)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = load_idx_dataset("fashion-mnist", None, "test").numpy().transpose(0, 2, 3, 1)  # NHWC uint8
    images = images[rng.permutation(len(images))[: args.num]]
    mirrored = images[:, :, ::-1]
    half = np.where(rng.random(len(images))[:, None, None, None] < 0.5, mirrored, images)
    for name, array in (("plain", images), ("half", half), ("all", mirrored)):
        result = score_real(args.out, name, array)
        low, high = result["fid_interval"]
        print(f"{name:>6} flipped: domain FID {result['fid']:.2f} [{low:.2f}, {high:.2f}], n = {args.num}")
    return 0


def score_real(out: Path, name: str, array: np.ndarray) -> dict:
    """Real images (NHWC uint8) written as OUT/NAME.npz and scored as `ddpm eval fid` scores samples
    against Fashion-MNIST's test split; its result (also in OUT/NAME.fid.json)."""
    np.savez(out / f"{name}.npz", np.ascontiguousarray(array))
    result_path = out / f"{name}.fid.json"
    command = [sys.executable, "-m", "ddpm", "eval", "fid", str(out / f"{name}.npz")]
    command += ["--dataset", "fashion-mnist", "--out", str(result_path), "--no-progress"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result_path.read_text())


if __name__ == "__main__":
    sys.exit(main())
