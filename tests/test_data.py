import numpy as np
import pytest
import torch
from conftest import write_idx
from PIL import Image

from ddpm.config import DataConfig
from ddpm.data import BatchOrder, load_dataset, make_toy, read_idx
from ddpm.errors import DataError
from ddpm.images import to_model_range, to_uint8


def test_idx_round_trip_and_scaling(idx_dir):
    ds = load_dataset(DataConfig(dataset="fashion-mnist", root=str(idx_dir), image_size=8))
    assert ds.data.shape == (40, 1, 8, 8) and ds.data.dtype == torch.uint8 and ds.is_image
    raw = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    assert np.array_equal(ds.data[:, 0].numpy(), raw)
    test = load_dataset(DataConfig(dataset="fashion-mnist", root=str(idx_dir), image_size=8, split="test"))
    assert len(test) == 10
    x = to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]
    assert torch.equal(to_uint8(to_model_range(ds.data)), ds.data)


def test_resize_and_channels(idx_dir):
    ds = load_dataset(DataConfig(dataset="fashion-mnist", root=str(idx_dir), image_size=4, channels=3))
    assert ds.data.shape == (40, 3, 4, 4)
    assert torch.equal(ds.data[:, 0], ds.data[:, 2])


def test_truncated_idx_is_reported(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 5, 5)))
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-7])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(DataConfig(root=str(tmp_path), image_size=5))


def make_folder(root, modes=("L", "L"), sizes=((40, 30), (30, 50))):
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for i, (mode, size) in enumerate(zip(modes, sizes, strict=True)):
        color = 200 if mode == "L" else (200, 10, 30)
        path = root / ("sub" if i % 2 else ".") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.new(mode, size, color).save(path)
    return root


def test_image_folder_grayscale_stays_one_channel(tmp_path):
    root = make_folder(tmp_path / "gray")
    ds = load_dataset(DataConfig(dataset="folder", root=str(root), image_size=16))
    assert ds.data.shape == (2, 1, 16, 16)
    assert (ds.data.float().mean() - 200).abs() < 2
    rgb = load_dataset(DataConfig(dataset="folder", root=str(root), image_size=16, channels=3))
    assert rgb.data.shape == (2, 3, 16, 16)


def test_image_folder_colour(tmp_path):
    root = make_folder(tmp_path / "rgb", modes=("RGB", "L"))
    ds = load_dataset(DataConfig(dataset="folder", root=str(root), image_size=8))
    assert ds.data.shape == (2, 3, 8, 8)
    red = ds.data[0, :, 4, 4].tolist()
    assert abs(red[0] - 200) <= 3 and red[1] < 20


def test_center_crop_keeps_the_centre(tmp_path):
    img = np.zeros((20, 60), dtype=np.uint8)
    img[:, 20:40] = 255  # a bright centre square
    (tmp_path / "c").mkdir()
    Image.fromarray(img).save(tmp_path / "c" / "a.png")
    ds = load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "c"), image_size=20))
    assert ds.data.float().mean() > 250


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "no images"),
        (lambda p: (p.mkdir(), (p / "bad.png").write_bytes(b"not an image")), "bad.png"),
    ],
)
def test_folder_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(dataset="folder", root=str(root), image_size=8))


def test_unknown_dataset_and_missing_dir(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(DataConfig(dataset="imagenet"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train IDX"):
        load_dataset(DataConfig(dataset="mnist", root=str(tmp_path / "empty")))


@pytest.mark.parametrize("name", ["swiss-roll", "s-curve", "moons"])
def test_toys_are_standardised_and_seeded(name):
    pts = make_toy(name, 5000, seed=1)
    assert pts.shape == (5000, 2)
    torch.testing.assert_close(pts.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(pts.std(0), torch.ones(2), atol=1e-4, rtol=0)
    assert torch.equal(pts, make_toy(name, 5000, seed=1))
    assert not torch.equal(pts, make_toy(name, 5000, seed=2))


def test_batch_order_covers_each_epoch_once():
    order = BatchOrder(10, 4, seed=3)
    first_epoch = torch.cat([order.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(first_epoch[:10].tolist()) == list(range(10))
    assert sorted(first_epoch[10:].tolist()) == list(range(10))
    assert not torch.equal(first_epoch[:10], first_epoch[10:])
    assert torch.equal(BatchOrder(10, 4, seed=3).indices(3), order.indices(3))


def test_cifar10_binary_release(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    records = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, size=(3, 3073), dtype=np.uint8)
        rec.tofile(folder / name)
        records[name] = rec
    ds = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32))
    assert ds.data.shape == (15, 3, 32, 32)
    first = records["data_batch_1.bin"][0, 1:].reshape(3, 32, 32)
    assert np.array_equal(ds.data[0].numpy(), first)
    test = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, split="test"))
    assert len(test) == 3
    (folder / "data_batch_3.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="truncated"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 514], [32896, 65535, 1000], [51400, 12850, 25700]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    data = load_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=3)).data
    expected = torch.tensor([[0, 1, 2], [128, 255, 4], [200, 50, 100]], dtype=torch.uint8)
    assert torch.equal(data[0, 0], expected)  # convert("L") would have made all but 0 into 255


def test_class_labels_are_loaded_only_when_asked(idx_dir, tmp_path):
    from ddpm.data import CLASS_NAMES, load_idx_dataset

    plain = load_dataset(DataConfig(root=str(idx_dir), image_size=8))
    assert plain.labels is None and plain.class_names is None
    labelled = load_dataset(DataConfig(root=str(idx_dir), image_size=8, labels="classes", split="test"))
    assert torch.equal(
        labelled.labels, load_idx_dataset("fashion-mnist", str(idx_dir), "test", kind="labels")
    )
    assert labelled.class_names == CLASS_NAMES["fashion-mnist"] and labelled.class_names[9] == "Ankle boot"


def test_cifar10_labels_are_the_record_label_bytes(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    records = np.zeros((4, 3073), np.uint8)
    records[:, 0] = [3, 0, 9, 3]
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records.tofile(folder / name)
    ds = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, labels="classes"))
    assert ds.labels.tolist() == [3, 0, 9, 3] * 5 and ds.class_names[3] == "cat"


def test_folder_classes_are_its_sub_folders_and_a_nested_folder_stays_unlabelled(tmp_path):
    for cls, n in (("dogs", 2), ("cats", 3)):
        (tmp_path / cls / "deeper").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp_path / cls / "deeper" / f"{i}.png")
    ds = load_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=4, labels="classes"))
    assert ds.class_names == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert load_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=4)).labels is None
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="every image must be in a class sub-folder"):
        load_dataset(DataConfig(dataset="folder", root=str(tmp_path), image_size=4, labels="classes"))
    with pytest.raises(DataError, match="swiss-roll has no class labels"):
        from ddpm.data import load_labels

        load_labels(DataConfig(dataset="swiss-roll", labels="classes"))
