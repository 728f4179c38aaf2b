"""Issue 23's two plots: domain FID (with its 95% interval) against training minutes for training recipes,
and against network evaluations for samplers on one run. Each point is a `ddpm` command a user could run
(a budgeted `ddpm train`, then `ddpm eval fid` with a fixed protocol); finished points are reused, so an
interrupted sweep resumes. Writes OUT/curve.json (every point's result) and OUT/curve.png.

    python bench/quality_curves.py minutes OUT --recipe demo="--preset fashion-mnist" \\
        --recipe new="--preset fashion-mnist --set train.lr_schedule=linear" --minutes 3 6 9
    python bench/quality_curves.py nfe OUT RUN --setting sde-dpm++3m:10:3 --setting edm:10 --setting ddim:50
    python bench/quality_curves.py points OUT --point old:6.6:base.fid.json --point new:6.6:new.fid.json

`points` plots `ddpm eval fid` results already made, at the training minutes given (for runs trained to a
step count beside other work, whose own clocks would overstate their minutes).

The protocol (--num 5000, seed 1, bf16, and for `minutes` sde-dpm++3m with eta 3 on 20 steps) is the one
issue 23 compares at; fewer samples are screening (the eval result says so). Costs on 2 cores: a point is
its training minutes plus about 3 minutes of sampling and scoring at 20 evaluations and 5,000 samples.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

DDPM = [sys.executable, "-m", "ddpm"]


def evaluations(sampler: str, steps: int) -> int:
    """Network evaluations per sample (unguided): EDM's Heun steps evaluate twice but for the last."""
    return 2 * steps - 1 if sampler == "edm" else steps


def parse_setting(text: str) -> tuple[str, int, float | None]:
    """SAMPLER:STEPS[:ETA] -> (sampler, steps, eta or None)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) <= 0:
        raise SystemExit(f"quality_curves: a setting is SAMPLER:STEPS[:ETA], got {text!r}")
    return parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 and parts[2] else None


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """NAME=TRAIN ARGS -> (name, the `ddpm train` arguments)."""
    name, sep, args = text.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f"quality_curves: a recipe is NAME=ARGS (NAME a word), got {text!r}")
    return name, shlex.split(args)


def run(command: list[str]) -> str:
    print("+", shlex.join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def score(source: Path, out: Path, protocol: list[str]) -> dict:
    """`ddpm eval fid` of ``source`` with ``protocol``, reused when ``out`` exists."""
    if not out.is_file():
        run([*DDPM, "eval", "fid", str(source), *protocol, "--out", str(out), "--no-progress"])
    return json.loads(out.read_text())


def point(result: dict, **extra) -> dict:
    """What a plot needs of an eval result."""
    return {
        **extra,
        "fid": result["fid"],
        "fid_interval": result["fid_interval"],
        "floor": result.get("real_floor", {}).get("fid"),
        "num_samples": result["num_samples"],
        "screening": result.get("screening", False),
    }


def minutes_curve(args) -> list[dict]:
    protocol = ["--num", str(args.num), "--seed", "1", "--precision", "bf16"]
    protocol += ["--sampler", "sde-dpm++3m", "--eta", "3", "--steps", "20"]
    points = []
    for name, train_args in map(parse_recipe, args.recipe):
        for minutes in args.minutes:
            run_dir = args.out / f"{name}-{minutes:g}min"
            if not (run_dir / "checkpoint.safetensors").is_file():
                run(
                    [
                        *DDPM,
                        "train",
                        *train_args,
                        "--budget",
                        f"{minutes:g}",
                        "--out",
                        str(run_dir),
                        "--no-progress",
                    ]
                )
            train = run_dir / "train.json"
            if not train.is_file():  # the run's own record of its budget, steps and training seconds
                from ddpm.checkpoint import Checkpoint

                state = Checkpoint(run_dir).train_state
                train.write_text(json.dumps({k: state.get(k) for k in ("step", "train_seconds", "budget")}))
            record = json.loads(train.read_text())
            result = score(run_dir, args.out / f"{name}-{minutes:g}min.fid.json", protocol)
            points.append(
                point(result, recipe=name, minutes=record["train_seconds"] / 60, steps=record["step"])
            )
    return points


def nfe_curve(args) -> list[dict]:
    points = []
    for sampler, steps, eta in map(parse_setting, args.setting):
        protocol = ["--num", str(args.num), "--seed", "1", "--precision", "bf16"]
        protocol += [
            "--sampler",
            sampler,
            "--steps",
            str(steps),
            *(["--eta", f"{eta:g}"] if eta is not None else []),
        ]
        name = f"{sampler}-{steps}" + (f"-eta{eta:g}" if eta is not None else "")
        result = score(args.run, args.out / f"{name}.fid.json", protocol)
        label = sampler + (f" eta {eta:g}" if eta is not None else "")
        points.append(point(result, recipe=label, nfe=evaluations(sampler, steps), steps=steps))
    return points


def given_points(args) -> list[dict]:
    points = []
    for text in args.point:
        name, minutes, path = (text.split(":", 2) + ["", ""])[:3]
        if not (name and path and minutes.replace(".", "", 1).isdigit()):
            raise SystemExit(f"quality_curves: a point is RECIPE:MINUTES:RESULT.json, got {text!r}")
        if not Path(path).is_file():
            raise SystemExit(f"quality_curves: no eval result at {path}")
        points.append(point(json.loads(Path(path).read_text()), recipe=name, minutes=float(minutes)))
    return points


def plot(points: list[dict], x: str, xlabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(p["recipe"] for p in points):
        mine = sorted((p for p in points if p["recipe"] == name), key=lambda p: p[x])
        xs, fids = [p[x] for p in mine], [p["fid"] for p in mine]
        low = [p["fid"] - p["fid_interval"][0] for p in mine]
        high = [p["fid_interval"][1] - p["fid"] for p in mine]
        ax.errorbar(xs, fids, yerr=[low, high], marker="o", capsize=3, label=name)
    floors = [p["floor"] for p in points if p["floor"] is not None]
    if floors:
        ax.axhline(max(floors), color="grey", linestyle="--", label="real-data floor")
    n = {p["num_samples"] for p in points}
    ax.set(xlabel=xlabel, ylabel=f"domain FID ({'/'.join(map(str, sorted(n)))} samples, 95% interval)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("minutes", help="FID against training minutes, one budgeted run per recipe and budget")
    m.add_argument("out", type=Path)
    m.add_argument("--recipe", action="append", required=True, help="NAME='ddpm train arguments'")
    m.add_argument("--minutes", type=float, nargs="+", required=True)
    n = sub.add_parser("nfe", help="FID against network evaluations, samplers on one run")
    n.add_argument("out", type=Path)
    n.add_argument("run", type=Path)
    n.add_argument("--setting", action="append", required=True, help="SAMPLER:STEPS[:ETA]")
    g = sub.add_parser("points", help="FID against training minutes, from eval results already made")
    g.add_argument("out", type=Path)
    g.add_argument("--point", action="append", required=True, help="RECIPE:MINUTES:RESULT.json")
    for p in (m, n):
        p.add_argument("--num", type=int, default=5000)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode in ("minutes", "points"):
        points = minutes_curve(args) if args.mode == "minutes" else given_points(args)
        x, label = "minutes", "training minutes (2 CPU cores)"
    else:
        points, x, label = nfe_curve(args), "nfe", "network evaluations per sample"
    (args.out / "curve.json").write_text(json.dumps(points, indent=1))
    plot(points, x, label, args.out / "curve.png")
    for p in points:
        low, high = p["fid_interval"]
        print(f"{p['recipe']:>24}  {x} {p[x]:7.2f}  FID {p['fid']:7.2f} [{low:.2f}, {high:.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
