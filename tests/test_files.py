import json
import os

import pytest

from ddpm.files import atomic_write, atomic_write_text, write_json


def test_writes_whole_files_with_usual_permissions(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    write_json(tmp_path / "r.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "r.json").read_text().endswith("}\n")
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fails(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt  # also on interrupts, not only on errors

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fails)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def publish(folder, **files) -> None:
    from ddpm.files import OutputFolder

    out = OutputFolder(folder, last="samples.json")
    for name, text in files.items():
        (out.staging / name.replace("_", ".")).write_text(text)
    out.publish()


def test_an_output_folder_is_replaced_whole_and_only_if_it_is_ours(tmp_path):
    from ddpm.errors import ConfigError
    from ddpm.files import OutputFolder

    publish(tmp_path / "out", grid_png="old grid", points_npy="old points", samples_json="old")
    publish(tmp_path / "out", grid_png="new grid", samples_json="new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "grid.png", "samples.json"]
    assert (tmp_path / "out" / "grid.png").read_text() == "new grid"  # and the stale points are gone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "images").mkdir()  # someone's images, not ddpm's samples
    with pytest.raises(ConfigError, match="holds images but no samples.json: not ddpm's output"):
        OutputFolder(tmp_path / "mine", last="samples.json")
    assert (tmp_path / "mine" / "images").is_dir()


def test_a_publish_cut_short_is_completed_by_the_next_owner(tmp_path):
    from ddpm.files import OutputFolder

    publish(tmp_path / "out", grid_png="old grid", samples_npz="old npz", samples_json="old")
    # killed while moving: the description is gone, the grid moved, the npz not yet
    staging = tmp_path / "out" / ".partial-dead"
    (staging / ".old").mkdir(parents=True)
    (staging / "samples.npz").write_text("new npz")
    (staging / "samples.json").write_text("new")
    (staging / ".names").write_text('["grid.png", "samples.npz"]')
    os.replace(tmp_path / "out" / "samples.json", staging / ".old" / "samples.json")
    (tmp_path / "out" / "grid.png").write_text("new grid")
    unfinished = tmp_path / "out" / ".partial-computing"  # killed before its results were complete
    unfinished.mkdir()
    (unfinished / "grid.png").write_text("half")
    out = OutputFolder(tmp_path / "out", last="samples.json")
    assert (tmp_path / "out" / "samples.npz").read_text() == "new npz"
    assert (tmp_path / "out" / "samples.json").read_text() == "new"
    assert (tmp_path / "out" / "grid.png").read_text() == "new grid"
    assert [p.name for p in (tmp_path / "out").glob(".partial-*")] == [out.staging.name]
    out.discard()


def test_one_writer_per_output_folder(tmp_path):
    from ddpm.errors import ConfigError
    from ddpm.files import OutputFolder

    first = OutputFolder(tmp_path / "out", last="samples.json")
    with pytest.raises(ConfigError, match=r"in use by another ddpm process writing there \(pid \d+\)"):
        OutputFolder(tmp_path / "out", last="samples.json")
    assert first.staging.is_dir()  # the second one did not clean up the first one's work
    first.discard()
    OutputFolder(tmp_path / "out", last="samples.json").discard()


@pytest.mark.parametrize("names", ['["../victim.txt"]', "[5]", '["grid.png", "/etc/passwd"]'])
def test_a_planted_staging_folder_moves_nothing(tmp_path, names):
    """A `.partial-*` folder someone else left, whose manifest names anything but ddpm's results, is
    refused before anything moves (it once moved ../victim.txt into place and deleted the original)."""
    from ddpm.errors import ConfigError
    from ddpm.files import OutputFolder

    (tmp_path / "victim.txt").write_text("mine")
    publish(tmp_path / "out", grid_png="old grid", samples_json="old")
    staging = tmp_path / "out" / ".partial-x"
    staging.mkdir()
    (staging / "samples.json").write_text("planted")
    (staging / ".names").write_text(names)
    (tmp_path / "out" / "victim.txt").write_text("planted")
    with pytest.raises(ConfigError, match="which ddpm never writes"):
        OutputFolder(tmp_path / "out", last="samples.json")
    assert (tmp_path / "victim.txt").read_text() == "mine"
    assert (tmp_path / "out" / "samples.json").read_text() == "old"
    assert (tmp_path / "out" / "grid.png").read_text() == "old grid"


def test_records_ddpm_writes_read_back_unless_strict(tmp_path):
    """json.dumps writes a NaN as NaN and a class folder's non-UTF-8 name as a lone surrogate: ddpm's own
    records read back (strict=False), while files users write are held to plain JSON."""
    from ddpm.errors import DataError
    from ddpm.files import read_json

    write_json(tmp_path / "samples.json", {"class_names": ["caf\udce9"], "fid": float("nan")})
    record = read_json(tmp_path / "samples.json", strict=False)
    assert record["class_names"] == ["caf\udce9"] and record["fid"] != record["fid"]
    with pytest.raises(DataError, match="not Unicode|NaN"):
        read_json(tmp_path / "samples.json")


def test_a_lock_taken_a_moment_ago_names_its_owner(tmp_path):
    """The owner writes its pid just after taking the lock: a process that loses the race in between
    reads the file again rather than calling the owner unknown (tests/test_train_processes.py raced here)."""
    import fcntl
    import threading

    from ddpm.errors import ConfigError
    from ddpm.files import DirectoryLock

    tmp_path.mkdir(exist_ok=True)
    held = open(tmp_path / ".lock", "a+")  # locked, pid not written yet
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def write_pid():
        held.write("4242\n")
        held.flush()

    timer = threading.Timer(0.2, write_pid)
    timer.start()
    try:
        with pytest.raises(ConfigError, match=r"in use by another ddpm process \(pid 4242\)"):
            DirectoryLock(tmp_path).acquire()
    finally:
        timer.join()
        held.close()
