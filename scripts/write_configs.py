"""Write configs/NAME.json for every preset in ddpm.presets: the files are generated, not kept by hand.

    .venv/bin/python scripts/write_configs.py          # rewrite the files that differ from their presets
    .venv/bin/python scripts/write_configs.py --check  # only say which differ (exit 1 if any)

Each file is what `ddpm config --preset NAME` prints; tests/test_presets.py fails when one has drifted.
A configs/*.json that names no preset is removed (reported under --check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm.presets import PRESETS, preset_json

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file differs")
    parser.add_argument("--dir", type=Path, default=CONFIGS, help="the folder (default: configs/)")
    args = parser.parse_args(argv)
    differ = []
    for name in PRESETS:
        path = args.dir / f"{name}.json"
        text = preset_json(name)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        differ.append(path)
        if not args.check:
            args.dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    stale = sorted(p for p in args.dir.glob("*.json") if p.stem not in PRESETS)
    if not args.check:
        for path in stale:
            path.unlink()
    for path in differ:
        print(f"{'differs' if args.check else 'wrote'}: {path}")
    for path in stale:
        print(f"{'no such preset' if args.check else 'removed (no such preset)'}: {path}")
    return 1 if args.check and (differ or stale) else 0


if __name__ == "__main__":
    sys.exit(main())
