"""Hostile data files (issue 21): a user's own files are never overwritten or deleted, and damaged,
deceptive or absurd JSON and text are one line naming the file, not a traceback or a silently wrong
result."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from test_checkpoint import metadata, write_raw

import ddpm.shards
from ddpm.captions import folder_captions
from ddpm.checkpoint import CHECKPOINT_NAME, Checkpoint
from ddpm.cli import main
from ddpm.clip import is_text_encoder
from ddpm.errors import CheckpointError, ConfigError, DataError
from ddpm.files import MAX_JSON_DEPTH, parse_json, read_json
from ddpm.rundir import RunDirectory
from ddpm.shards import ShardIndex, load_all_shards, make_shards
from ddpm.text_metrics import sample_record

DEEP = "[" * 100_000 + "]" * 100_000  # a RecursionError for Python's json module


def image_folder(folder, n=5):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def snapshot(folder):
    """Every path below ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ddpm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ---- make-shards writes only into a folder of its own ----


@pytest.mark.parametrize(
    "theirs, message",
    [
        ({"shard-000000.tar": b"my tar", "shard-000007.tar": b"mine too"}, "shard-000000.tar (and 1 more)"),
        ({"shards.json": b'{"format": "webdataset"}', "shard-000000.tar": b"x"}, "not a ddpm shard index"),
        ({"shards.json": b"not json"}, "not ddpm's shard index"),
        ({"shards.json": DEEP.encode()}, "nested more than"),
        ({"shards.json": b'{"format": "ddpm-shards", "count": NaN}'}, "NaN"),
    ],
)
def test_make_shards_never_overwrites_or_deletes_files_it_did_not_write(tmp_path, capsys, theirs, message):
    folder = image_folder(tmp_path / "images")
    out = tmp_path / "out"
    out.mkdir()
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert main(["make-shards", str(folder), "--out", str(out), "--shard-size", "2"]) == 2
    one_line_error(capsys, message, "choose another --out")
    assert snapshot(out) == before  # byte-identical, nothing added


def test_make_shards_keeps_a_shard_its_index_does_not_list(tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    out = tmp_path / "out"
    make_shards(folder, out, shard_size=2)
    (out / "shard-000099.tar").write_bytes(b"someone's own, dropped among ddpm's")
    before = snapshot(out)
    assert main(["make-shards", str(folder), "--out", str(out), "--shard-size", "5"]) == 2
    one_line_error(capsys, "shard-000099.tar, which no ddpm shards.json there lists")
    assert snapshot(out) == before


def test_make_shards_reruns_into_its_own_folder_even_after_a_kill(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "images", 7)
    out = tmp_path / "out"
    make_shards(folder, out, shard_size=2)  # 4 shards
    real, calls = ddpm.shards.atomic_write, []

    def killed(path, write):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(ddpm.shards, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        make_shards(folder, out, shard_size=1)  # killed after its first shard
    monkeypatch.undo()
    with pytest.raises(DataError, match="is being written by `ddpm make-shards`"):
        ShardIndex.load(str(out))
    index = make_shards(folder, out, shard_size=3)  # unfinished, but its own: written again
    assert [s["count"] for s in index["shards"]] == [3, 3, 1]
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"shard-00000{i}.tar" for i in range(3)),
        "shards.json",
    ]
    assert len(load_all_shards(str(out), 6, None)) == 7


def test_make_shards_writes_nothing_when_an_image_is_bad(tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    (folder / "zzz.png").write_bytes(b"not an image")
    assert main(["make-shards", str(folder), "--out", str(tmp_path / "out"), "--shard-size", "2"]) == 2
    one_line_error(capsys, "cannot read image", "zzz.png")
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    assert main(["make-shards", str(folder), "--out", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "is a file, not a directory")


# ---- shards.json: counts, names, links ----


def shards_with_index(tmp_path, shards: str) -> str:
    """A shard folder of 5 images in one shard, whose shards.json lists ``shards`` (JSON text)."""
    out = tmp_path / "shards"
    make_shards(image_folder(tmp_path / "images"), out, shard_size=5)
    index = f'{{"format": "ddpm-shards", "version": 1, "count": 5, "channels": 3, "shards": {shards}}}'
    (out / "shards.json").write_text(index)
    return str(out)


def train_fails(tmp_path, capsys, root, *needles):
    run = tmp_path / "run"
    argv = ["train", "--dataset", "shards", "--data-dir", root, "--out", str(run), "--device", "cpu"]
    assert main(argv) == 2
    one_line_error(capsys, *needles)
    assert not run.exists()


@pytest.mark.parametrize(
    "count, message",
    [
        ("NaN", "not valid JSON (NaN is not a number JSON allows)"),
        ("Infinity", "not valid JSON (Infinity is not a number JSON allows)"),
        ("-Infinity", "-Infinity is not a number"),
        ("1e999", "not valid JSON (1e999 is too large a number)"),
        ("1" * 5000, "an integer of 5000 digits is too long"),
        ("10000000000000000000000", "holds 10000000000000000000000 images; a count is a whole number"),
        ("-3", "holds -3 images"),
        ("0", "holds 0 images"),
        ("2.5", "holds 2.5 images"),
        ("5.0", "holds 5.0 images"),
        ("true", "holds True images"),
        ('"5"', "holds '5' images"),
        ("null", "holds None images"),
    ],
)
def test_absurd_shard_counts_are_one_line(tmp_path, capsys, count, message):
    root = shards_with_index(tmp_path, f'[{{"name": "shard-000000.tar", "count": {count}}}]')
    train_fails(tmp_path, capsys, root, "shards.json", message)


@pytest.mark.parametrize(
    "name", ["../outside.tar", "{outside}", "sub/shard-000000.tar", "", ".", "..", "a\\b.tar", "x\ny.tar", 7]
)
def test_a_shard_named_outside_the_folder_is_refused(tmp_path, capsys, name):
    outside = tmp_path / "outside.tar"
    make_shards(image_folder(tmp_path / "theirs"), tmp_path / "elsewhere", shard_size=5)
    os.replace(tmp_path / "elsewhere" / "shard-000000.tar", outside)  # a real shard, never to be read
    name = name.format(outside=outside) if isinstance(name, str) else name
    root = shards_with_index(tmp_path, json.dumps([{"name": name, "count": 5}]))
    train_fails(tmp_path, capsys, root, "shards must be plain file names inside the folder")
    with pytest.raises(DataError, match="plain file names"):
        load_all_shards(root, 6, None)


def test_a_shard_linked_outside_the_folder_is_refused(tmp_path, capsys):
    root = tmp_path / "shards"
    make_shards(image_folder(tmp_path / "images"), root, shard_size=5)
    os.replace(root / "shard-000000.tar", tmp_path / "outside.tar")
    (root / "shard-000000.tar").symlink_to(tmp_path / "outside.tar")
    train_fails(tmp_path, capsys, str(root), "shard-000000.tar", "leads outside it")
    with pytest.raises(DataError, match="leads outside it"):
        load_all_shards(str(root), 6, None)
    (root / "shard-000000.tar").unlink()  # a link that stays inside is fine
    os.replace(tmp_path / "outside.tar", root / "real.tar")
    (root / "shard-000000.tar").symlink_to("real.tar")
    assert len(load_all_shards(str(root), 6, None)) == 5


def test_a_shard_holding_more_images_than_its_count_is_not_read_into_memory(tmp_path):
    root = shards_with_index(tmp_path, '[{"name": "shard-000000.tar", "count": 2}]')
    with pytest.raises(DataError, match="holds 5 images; shards.json says 2"):
        load_all_shards(root, 6, None)


def test_an_image_named_with_a_newline_in_a_shard_is_still_one_line(tmp_path):
    root = tmp_path / "shards"
    make_shards(image_folder(tmp_path / "images", 1), root, shard_size=5)
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        member = tarfile.TarInfo("bad\nname.png")
        member.size = 9
        tar.addfile(member, io.BytesIO(b"not a png"))
    with pytest.raises(DataError) as caught:
        load_all_shards(str(root), 6, None)
    assert "\n" not in str(caught.value) and "bad\\nname.png" in str(caught.value)


# ---- captions: metadata.jsonl and .txt files ----


def caption_folder(root, names=("a.png", "b.png")):
    root.mkdir()
    for i, name in enumerate(names):
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(root / name)
    return root, sorted(root.glob("*.png"))


@pytest.mark.parametrize(
    "second_row, message",
    [
        ('{"file_name": "b.png", "text": null}', 'line 2: "text" must be a string, not null'),
        ('{"file_name": "b.png", "text": 7}', 'line 2: "text" must be a string, not 7'),
        ('{"file_name": "b.png", "text": ["a", "b"]}', 'line 2: "text" must be a string, not ["a", "b"]'),
        ('{"file_name": "b.png", "text": {"en": "x"}}', 'line 2: "text" must be a string, not {"en": "x"}'),
        ('{"file_name": null, "text": "x"}', 'line 2: expected {"file_name": ..., "text": ...}'),
        ('["b.png", "x"]', 'line 2: expected {"file_name": ..., "text": ...}'),
        ('{"file_name": "b.png", "text": NaN}', "line 2: not valid JSON (NaN"),
        ('{"file_name": "b.png", "text": "x"', "line 2: not valid JSON (column 35: Expecting ','"),
        (DEEP, "line 2: nested more than 64 levels deep"),
        ('{"file_name": "b.png", "text": "\\ud800"}', "line 2: a string that is not Unicode"),
    ],
)
def test_a_caption_that_is_not_text_is_refused_naming_the_line(tmp_path, second_row, message):
    root, files = caption_folder(tmp_path / "jsonl")
    first = json.dumps({"file_name": "a.png", "text": "an ant"})
    (root / "metadata.jsonl").write_text(f"{first}\n{second_row}\n")
    with pytest.raises(DataError, match="metadata.jsonl") as caught:
        folder_captions(root, files)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_captions_that_are_not_utf8_are_one_line_naming_the_file(tmp_path):
    root, files = caption_folder(tmp_path / "jsonl")
    (root / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"cannot read .*metadata.jsonl: not UTF-8 text \(byte 35"):
        folder_captions(root, files)
    root, files = caption_folder(tmp_path / "txt")
    (root / "a.txt").write_text("fine")
    (root / "b.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(DataError, match=r"cannot read caption .*b.txt: not UTF-8 text"):
        folder_captions(root, files)


def test_a_caption_may_hold_a_line_separator(tmp_path):
    root, files = caption_folder(tmp_path / "jsonl")
    rows = [{"file_name": "a.png", "text": "one\u2028two"}, {"file_name": "b.png", "text": "b"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert folder_captions(root, files) == ["one\u2028two", "b"]


# ---- every JSON file read: one reader ----


def test_the_reader_refuses_what_json_loads_would_crash_on_or_accept(tmp_path):
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x") is not None
    cases = {
        "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1): "nested more than 64 levels deep",
        DEEP: "nested more than 64 levels deep",
        '{"a": NaN}': "NaN is not a number JSON allows",
        "[1e400]": "1e400 is too large a number",
        "-" + "9" * 4400: "an integer of 4400 digits is too long",
        '"\\udc80"': "a string that is not Unicode (lone '\\udc80')",
        "{'a': 1}": "not valid JSON (column 2: Expecting property name enclosed in double quotes)",
        '{\n"a": }': "not valid JSON (line 2 column 6",
    }
    for text, message in cases.items():
        with pytest.raises(DataError) as caught:
            parse_json(text, "x")
        assert message in str(caught.value) and str(caught.value).startswith("cannot read x: ")
    assert parse_json('"\\ud83d\\ude00"', "x") == "\U0001f600"  # a pair is one character
    assert parse_json(b'\xef\xbb\xbf{"a": 1}', "x") == {"a": 1}  # a byte-order mark is fine
    path = tmp_path / "f.json"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match=r"cannot read settings .*f.json: not UTF-8 text \(byte 7"):
        read_json(path, "settings", error=ConfigError)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="f.json holds a JSON list, not an object"):
        read_json(path, expect=dict)
    with pytest.raises(DataError, match="f.json: larger than 5 bytes"):
        read_json(path, max_bytes=5)
    with pytest.raises(DataError, match=r"cannot read .*missing.json: No such file"):
        read_json(tmp_path / "missing.json")


def test_a_deep_pipeline_json_is_one_line(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    for content, message in ((DEEP, "nested more than 64 levels deep"), ("\ufeff{\x00", "not valid JSON")):
        (pipe / "pipeline.json").write_text(content)
        argv = ["generate", str(pipe), "--out", str(tmp_path / "out"), "--num", "1", "--no-progress"]
        assert main(argv) == 2
        one_line_error(capsys, "pipeline.json", message)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.json", DEEP.encode(), "nested more than 64 levels deep"),
        ("c.json", b'{"train": {"lr": NaN}}', "NaN is not a number JSON allows"),
        ("c.json", b'{"name": "caf\xe9"}', "not UTF-8 text"),
        ("c.toml", b"x = " + DEEP.encode(), "cannot parse config file"),
        ("c.toml", b"x = " + b"[" * 70 + b"]" * 70, "nested more than 64 levels deep"),
        ("c.toml", b'name = "caf\xe9"', "not UTF-8 text"),
    ],
)
def test_a_hostile_config_file_is_one_line(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    assert main(["config", "--config", str(tmp_path / name)]) == 2
    one_line_error(capsys, name, message)


def test_deep_checkpoint_metadata_is_damaged_metadata(tmp_path):
    path = write_raw(tmp_path / CHECKPOINT_NAME, meta=metadata(config=DEEP))
    with pytest.raises(CheckpointError, match="has damaged metadata .*nested more than 64 levels deep"):
        Checkpoint(path)
    path = write_raw(
        tmp_path / CHECKPOINT_NAME, meta=metadata(train_state='{"step": 1, "latent_scale": NaN}')
    )
    assert Checkpoint(path).train_state["step"] == 1  # a NaN ddpm itself measured and wrote is kept


def test_records_beside_samples_and_text_encoders_are_read_safely(tmp_path):
    (tmp_path / "samples.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="samples.json holds a JSON list, not an object"):
        sample_record(tmp_path)
    (tmp_path / "config.json").write_text(DEEP)
    assert not is_text_encoder(tmp_path)  # (a RecursionError before)


def test_a_metrics_row_cut_inside_a_character_is_dropped_on_resume(tmp_path):
    run = RunDirectory(tmp_path)
    rows = [json.dumps({"step": s, "note": "é"}, ensure_ascii=False) for s in (1, 2, 3)]
    data = "\n".join(rows).encode()
    run.metrics_path.write_bytes(data[:-4])  # the last row cut in the middle of "é"
    assert run.keep_metrics_up_to(5) == 1
    assert run.metrics_path.read_text() == rows[0] + "\n" + rows[1] + "\n"
