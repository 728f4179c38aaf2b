"""What the made captions let a prompt such as "a photo of a coat" ask for on Fashion-MNIST: real training
images, NUM of each class, drawn from the whole class or only from the images whose made caption has no
attribute word (the middle thirds of shade and size, which is all that such a caption described before
data.caption_attribute_dropout), scored against the test split as `ddpm eval fid` scores samples. A
text model that follows those prompts exactly cannot score below the second row.

    python bench/caption_floor.py OUT [--num 500]

Writes OUT/{class,no-attributes}.npz and their eval results; prints one line each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from flip_floor import score_real  # (bench/ is on the path when this script runs)

from ddpm.captions import attribute_words
from ddpm.data import load_idx_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--num", type=int, default=500, help="images per class (default 500)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = load_idx_dataset("fashion-mnist", None, "train")
    labels = load_idx_dataset("fashion-mnist", None, "train", kind="labels").long().flatten()
    plain = np.array([not words for words in attribute_words(images, labels)])
    picks = {"class": [], "no-attributes": []}
    for c in range(10):
        in_class = labels.numpy() == c
        picks["class"].append(rng.choice(np.flatnonzero(in_class), args.num, replace=False))
        picks["no-attributes"].append(rng.choice(np.flatnonzero(in_class & plain), args.num, replace=False))
    for name, chosen in picks.items():
        array = images[np.concatenate(chosen)].numpy().transpose(0, 2, 3, 1)  # NHWC uint8
        result = score_real(args.out, name, array)
        low, high = result["fid_interval"]
        print(f"{name:>13}: domain FID {result['fid']:.2f} [{low:.2f}, {high:.2f}], {args.num} a class")
    return 0


if __name__ == "__main__":
    sys.exit(main())
