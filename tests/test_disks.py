"""Full and read-only disks, on a small tmpfs mounted in a private mount namespace (`unshare -m`), since
CI runs as root and chmod does not stop root's writes."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_config

UNSHARE = shutil.which("unshare")


def can_mount() -> bool:
    if UNSHARE is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"
    return subprocess.run([UNSHARE, "-m", "sh", "-c", probe], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not can_mount(), reason="mounting a tmpfs in a private namespace is refused here"
)


def on_tmpfs(mount, size_kb: int, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with a fresh tmpfs of ``size_kb`` at ``mount``; $DDPM runs the CLI."""
    mount.mkdir(exist_ok=True)
    head = f'mount -t tmpfs -o size={size_kb}k tmpfs "{mount}" && DDPM="{sys.executable} -m ddpm" && '
    return subprocess.run(
        [UNSHARE, "-m", "sh", "-c", head + script], capture_output=True, text=True, timeout=120
    )


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(idx_dir, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(tiny_config(idx_dir, steps=6, checkpoint_every=2, sample_every=1000).to_dict())
    )
    probe = [sys.executable, "-m", "ddpm", "train", "--config", str(config), "--steps", "2", "--no-progress"]
    assert subprocess.run([*probe, "--out", str(tmp_path / "probe")], capture_output=True).returncode == 0
    checkpoint_kb = (tmp_path / "probe" / "checkpoint.safetensors").stat().st_size // 1024
    mount = tmp_path / "disk"
    # room for one checkpoint and the small files, not for the second one written beside it
    script = f'$DDPM train --config "{config}" --out "{mount}/run" --no-progress; echo "rc=$?"; '
    read_step = "import sys; from ddpm.checkpoint import Checkpoint; print(Checkpoint(sys.argv[1]).step)"
    script += f'{sys.executable} -c "{read_step}" "{mount}/run"'
    result = on_tmpfs(mount, int(checkpoint_kb * 1.5) + 48, script)
    err = result.stderr.strip()
    assert "rc=2" in result.stdout, result.stderr[-2000:]
    assert err.startswith("ddpm: error: cannot write checkpoint") and "No space left on device" in err
    assert "previous one is intact" in err and err.count("\n") == 0
    assert last_line(result.stdout) == "2"  # the first checkpoint, whole


def test_a_read_only_disk_is_one_line_before_any_work(idx_dir, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(tiny_config(idx_dir, steps=2).to_dict()))
    mount = tmp_path / "disk"
    script = f'$DDPM train --config "{config}" --out "{mount}/run" --no-progress > /dev/null && '
    script += f'mount -o remount,ro "{mount}" && '
    script += f'$DDPM sample "{mount}/run" --num 2 --no-progress; echo "sample rc=$?" >&2; '
    script += f'$DDPM train --resume "{mount}/run" --steps 4 --no-progress; echo "train rc=$?" >&2; '
    script += f'$DDPM figures "{mount}/run" --figure forward --data-dir "{idx_dir}"; echo "figures rc=$?" >&2'
    result = on_tmpfs(mount, 4096, script)
    lines = result.stderr.strip().splitlines()
    for command in ("sample", "train", "figures"):
        at = lines.index(f"{command} rc=2")
        assert lines[at - 1].startswith("ddpm: error: Read-only file system"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_full_disk_during_import_is_one_line(tmp_path):
    from diffusers import UNet2DModel

    from ddpm.convert import diffusers_unet_config
    from ddpm.presets import preset

    cfg = preset("cifar10").model
    cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions = 32, (1, 2), 1, (16,)
    UNet2DModel(**diffusers_unet_config(cfg, 32, 3)).save_pretrained(tmp_path / "pipe" / "unet")
    mount = tmp_path / "disk"
    result = on_tmpfs(mount, 64, f'$DDPM import "{tmp_path / "pipe"}" --out "{mount}/run"; echo "rc=$?"')
    assert "rc=2" in result.stdout
    err = result.stderr.strip()
    assert (
        err.startswith("ddpm: error: cannot write checkpoint") and "No space left" in err and "\n" not in err
    )
