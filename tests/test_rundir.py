import json
import subprocess
import sys

import pytest

from ddpm.errors import ConfigError
from ddpm.rundir import RunDirectory


def test_one_owner_at_a_time_and_the_lock_dies_with_its_process(tmp_path):
    a = RunDirectory(tmp_path / "run")
    a.lock()
    b = RunDirectory(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"in use by another ddpm process \(pid \d+\)"):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()
    # a process killed while holding the lock leaves nothing that blocks the next owner
    code = "import os, sys; from ddpm.rundir import RunDirectory; RunDirectory(sys.argv[1]).lock(); "
    code += "os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")]).returncode == -9
    a.lock()
    a.unlock()


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    run = RunDirectory(tmp_path)
    (tmp_path / "samples").mkdir()
    for name in (".checkpoint.safetensors.abc.tmp", "samples/.step_0000010.png.x.tmp"):
        (tmp_path / name).write_text("half")
    (tmp_path / "checkpoint.safetensors").write_text("kept")
    removed = run.remove_temporary_files()
    assert len(removed) == 2 and not list(tmp_path.rglob("*.tmp"))
    assert (tmp_path / "checkpoint.safetensors").read_text() == "kept"


def test_metrics_rows_past_the_checkpoint_are_dropped(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.keep_metrics_up_to(3) == 0  # no log yet
    rows = [json.dumps({"step": s, "loss": 0.1}) for s in (1, 2, 3, 4, 5)]
    run.metrics_path.write_text("\n".join(rows) + '\n{"step": 6, "lo')  # a row cut short by a kill
    assert run.keep_metrics_up_to(3) == 3
    assert [json.loads(r)["step"] for r in run.metrics_path.read_text().splitlines()] == [1, 2, 3]
    assert run.keep_metrics_up_to(3) == 0
