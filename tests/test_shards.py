import functools
import hashlib
import http.server
import json
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import load_image_folder
from ddpm.errors import DataError
from ddpm.shards import ShardIndex, ShardStream, load_all_shards, make_shards, stream_batches


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i in range(23):
        where = d / "sub" if i % 3 else d
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(where / f"{i:03d}.png")
    return d


def digest(image) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_shards_hold_the_folder_in_the_webdataset_layout(folder, tmp_path):
    index = make_shards(folder, tmp_path / "shards", shard_size=5)
    assert index["count"] == 23 and index["channels"] == 3
    assert [s["count"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    with tarfile.open(tmp_path / "shards" / "shard-000001.tar") as tar:
        assert tar.getnames() == [f"{i:09d}.png" for i in range(5, 10)]  # KEY.EXT, one image per key
    images = load_all_shards(str(tmp_path / "shards"), 8, None)
    assert torch.equal(images, load_image_folder(str(folder), 8, None))


@pytest.mark.parametrize("readers", [1, 2, 3, 5])
def test_every_epoch_reads_every_image_once_at_any_reader_count(folder, tmp_path, readers):
    make_shards(folder, tmp_path / "shards", shard_size=4)
    index = ShardIndex.load(str(tmp_path / "shards"))
    stream = ShardStream(index, 8, 3, seed=1, batch=1, rank=0, world_size=1, workers=1, skip_batches=0)
    everything = sorted(digest(x) for x in load_all_shards(str(tmp_path / "shards"), 8, None))
    for epoch in (0, 1):
        seen = []
        for reader in range(readers):
            its_images = sum(index.shards[s][1] for s in stream.shards_of(reader, readers, epoch))
            before = sum(
                index.shards[s][1] for e in range(epoch) for s in stream.shards_of(reader, readers, e)
            )
            images = stream.images(reader, readers, skip=before)
            seen += [digest(next(images)) for _ in range(its_images)]
        assert sorted(seen) == everything


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_where_it_stopped(folder, tmp_path, workers):
    make_shards(folder, tmp_path / "shards", shard_size=3)
    root = str(tmp_path / "shards")
    _, straight = stream_batches(root, 8, None, seed=2, batch=4, workers=workers)
    batches = [next(straight) for _ in range(9)]  # past the first epoch (23 images)
    _, resumed = stream_batches(root, 8, None, seed=2, batch=4, workers=workers, start_batch=5)
    for expected in batches[5:]:
        assert torch.equal(next(resumed), expected)
    assert batches[0].shape == (4, 3, 8, 8) and batches[0].dtype == torch.uint8


def test_shards_stream_over_http(folder, tmp_path):
    make_shards(folder, tmp_path / "shards", shard_size=6)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "shards"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert torch.equal(load_all_shards(url, 8, None), load_all_shards(str(tmp_path / "shards"), 8, None))
        with pytest.raises(DataError, match="cannot fetch"):
            ShardIndex.load(url + "/missing")
    finally:
        server.shutdown()


def test_bad_shards_are_one_clear_error(folder, tmp_path):
    with pytest.raises(DataError, match="needs the shards' directory"):
        ShardIndex.load(None)
    with pytest.raises(DataError, match="cannot read"):
        ShardIndex.load(str(tmp_path))
    make_shards(folder, tmp_path / "shards", shard_size=10)
    root = str(tmp_path / "shards")
    with pytest.raises(DataError, match="3 shards cannot feed 4 readers"):
        stream_batches(root, 8, None, seed=0, batch=2, world_size=2, workers=2)
    index = json.loads((tmp_path / "shards" / "shards.json").read_text())
    index["shards"][0]["count"] = 11
    (tmp_path / "shards" / "shards.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="holds 10 images; shards.json says 11"):
        load_all_shards(root, 8, None)
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"not a tar file at all" * 30)
    with pytest.raises(DataError, match="shard-000000.tar is damaged"):
        load_all_shards(root, 8, None)
    with pytest.raises(DataError, match="shard_size must be positive") as e:
        make_shards(folder, tmp_path / "more", shard_size=0)
    assert e.value.field == "shard_size"  # the CLI says --shard-size


def test_training_streams_shards_and_resumes_exactly(folder, tmp_path):
    from conftest import tiny_config

    from ddpm.checkpoint import Checkpoint
    from ddpm.train import Trainer

    make_shards(folder, tmp_path / "shards", shard_size=4)

    def config(steps):
        cfg = tiny_config(tmp_path, steps=steps)
        cfg.data.dataset, cfg.data.root = "shards", str(tmp_path / "shards")
        return cfg

    Trainer(config(8), tmp_path / "a", progress=False).train()  # 8 x 4 images: into the second epoch
    Trainer(config(3), tmp_path / "b", progress=False).train()
    Trainer(config(8), tmp_path / "b", resume=True, progress=False).train()
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    assert a.config["data"]["channels"] == 3
    for name, value in a.model.items():
        assert torch.equal(b.model[name], value), name


def test_bad_shards_stop_training_before_the_run_directory_is_made(folder, tmp_path):
    from conftest import tiny_config

    from ddpm.train import Trainer

    make_shards(folder, tmp_path / "shards", shard_size=10)
    cfg = tiny_config(tmp_path, steps=2)
    cfg.data.dataset, cfg.data.root, cfg.data.loader_workers = "shards", str(tmp_path / "shards"), 4
    with pytest.raises(DataError, match="3 shards cannot feed 4 readers"):
        Trainer(cfg, tmp_path / "run", progress=False)
    cfg.data.loader_workers = 2
    (tmp_path / "shards" / "shard-000002.tar").unlink()
    with pytest.raises(
        DataError, match=r"1 shard\(s\) listed in shards.json are missing, e.g. shard-000002.tar"
    ):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    index = json.loads((tmp_path / "shards" / "shards.json").read_text())
    (tmp_path / "shards" / "shards.json").write_text(json.dumps({**index, "channels": 7}))
    with pytest.raises(DataError, match="7 channels; 1 or 3"):
        ShardIndex.load(str(tmp_path / "shards"))


def test_a_worker_error_is_one_line(folder, tmp_path):
    from conftest import tiny_config

    from ddpm.train import Trainer

    make_shards(folder, tmp_path / "shards", shard_size=10)
    cfg = tiny_config(tmp_path, steps=2)
    cfg.data.dataset, cfg.data.root, cfg.data.loader_workers = "shards", str(tmp_path / "shards"), 2
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    for shard in (tmp_path / "shards").glob("shard-*.tar"):
        shard.write_bytes(b"damaged" * 100)
    with pytest.raises(DataError) as caught:
        trainer.train_step()
    assert "\n" not in str(caught.value) and "is damaged" in str(caught.value)


def test_making_shards_again_leaves_no_stale_ones(folder, tmp_path):
    make_shards(folder, tmp_path / "shards", shard_size=3)  # 8 shards
    (tmp_path / "shards" / ".shard-000001.tar.x.tmp").write_bytes(b"killed")
    make_shards(folder, tmp_path / "shards", shard_size=10)  # 3 shards
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shards.json"]
