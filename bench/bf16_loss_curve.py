"""bf16 autocast against fp32 on the same short training run: the loss curves, window by window.

    .venv/bin/python bench/bf16_loss_curve.py [--steps 400] [--window 50]

Both runs use the fashion-mnist preset with the same seed, so they see the same batches, t and noise;
only the network's precision differs. Prints the mean loss per window for each and their difference
against the spread of the fp32 losses within the window (the noise).
"""

import argparse
import statistics
import tempfile
import time

from ddpm.presets import preset
from ddpm.train import Trainer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--window", type=int, default=50)
    args = p.parse_args()
    losses, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = preset("fashion-mnist")
        cfg.train.precision = precision
        with tempfile.TemporaryDirectory() as run:
            trainer = Trainer(cfg, run, progress=False)
            start = time.perf_counter()
            losses[precision] = [trainer.train_step()["loss"] for _ in range(args.steps)]
            seconds[precision] = time.perf_counter() - start
    print(
        f"fashion-mnist preset, batch {cfg.train.batch_size}, {args.steps} steps: "
        f"fp32 {seconds['fp32']:.0f} s, "
        f"bf16 {seconds['bf16']:.0f} s ({seconds['fp32'] / seconds['bf16']:.2f}x)\n"
    )
    print("| steps | fp32 mean loss | bf16 mean loss | bf16 - fp32 | std error of the fp32 window mean |")
    print("|---|---|---|---|---|")
    for start in range(0, args.steps, args.window):
        a = losses["fp32"][start : start + args.window]
        b = losses["bf16"][start : start + args.window]
        noise = statistics.stdev(a) / len(a) ** 0.5
        print(
            f"| {start + 1}-{start + len(a)} | {statistics.mean(a):.4f} | {statistics.mean(b):.4f} | "
            f"{statistics.mean(b) - statistics.mean(a):+.4f} | {noise:.4f} |"
        )


if __name__ == "__main__":
    main()
