import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.errors import DataError
from ddpm.images import (
    load_sample_labels,
    load_samples,
    make_grid,
    save_grid,
    save_npz,
    save_pngs,
    to_model_range,
    to_uint8,
)


def test_pixel_conversions_round_trip_every_level():
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(levels)
    assert x.min() == -1 and x.max() == 1 and x.dtype == torch.float32
    assert torch.equal(to_uint8(x), levels)
    assert torch.equal(
        to_uint8(torch.tensor([-3.0, 3.0, 0.0])), torch.tensor([0, 255, 128], dtype=torch.uint8)
    )


def test_grid_places_each_image():
    images = torch.stack([torch.full((3, 2, 2), 10 * i, dtype=torch.uint8) for i in range(1, 6)])
    grid = make_grid(images, nrow=3, padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 3)
    assert grid[1, 1, 0] == 10 and grid[1, 4, 0] == 20 and grid[4, 1, 0] == 40 and grid[0, 0, 0] == 0
    assert grid[4, 7, 0] == 0  # the sixth cell stays empty


def test_samples_round_trip_through_npz_and_pngs(tmp_path):
    images = torch.randint(
        0, 256, (3, 1, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    save_npz(images, tmp_path / "samples.npz")
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (3, 5, 5, 1)
    assert torch.equal(load_samples(tmp_path), images)
    save_pngs(images, tmp_path / "pngs", start=10)
    assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "pngs" / "000011.png"))), images[1, 0])
    save_grid(images, tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").mode == "L"


def test_bad_samples_are_reported(tmp_path):
    with pytest.raises(DataError, match="no samples at"):
        load_samples(tmp_path)
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 1), np.float32))
    with pytest.raises(DataError, match="expected uint8 arr_0"):
        load_samples(tmp_path / "f.npz")
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read samples"):
        load_samples(tmp_path / "bad.npz")


def test_an_empty_npz_is_refused(tmp_path):
    np.savez(tmp_path / "e.npz", arr_0=np.zeros((0, 28, 28, 1), np.uint8))
    with pytest.raises(DataError, match="holds no samples"):
        load_samples(tmp_path / "e.npz")


def test_a_class_grid_has_one_row_per_class_padded_with_blank_cells(tmp_path):
    from ddpm.images import save_class_grid

    images = torch.stack([torch.full((1, 2, 2), 10 * (i + 1), dtype=torch.uint8) for i in range(5)])
    labels = torch.tensor([2, 0, 2, 2, 0])  # class 0: images 1, 4; class 2: images 0, 2, 3
    save_class_grid(images, labels, tmp_path / "g.png")
    grid = np.array(Image.open(tmp_path / "g.png"))
    cell = 2 + 2  # 2 px images, 2 px padding
    top_left = [[int(grid[2 + r * cell, 2 + c * cell]) for c in range(3)] for r in range(2)]
    assert grid.shape == (2 + 2 * cell, 2 + 3 * cell)
    assert top_left == [[20, 50, 0], [10, 30, 40]]  # in class order, blank where a class has fewer


def test_sample_labels_round_trip_and_old_samples_have_none(tmp_path):
    from ddpm.images import load_sample_labels

    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    save_npz(images, tmp_path / "old.npz")
    assert load_sample_labels(tmp_path / "old.npz") is None
    save_npz(images, tmp_path / "samples.npz", torch.tensor([4, 0, 9]))
    assert load_sample_labels(tmp_path).tolist() == [4, 0, 9]
    assert torch.equal(load_samples(tmp_path), images)  # arr_0 as before, for the common FID tools


def test_a_truncated_samples_file_is_one_line(tmp_path):
    np.savez(tmp_path / "samples.npz", np.zeros((4, 8, 8, 1), np.uint8))
    whole = (tmp_path / "samples.npz").read_bytes()
    for cut in (whole[: len(whole) // 2], whole[:-10], b"PK\x03\x04junk"):
        (tmp_path / "samples.npz").write_bytes(cut)
        with pytest.raises(DataError, match="cannot read samples"):
            load_samples(tmp_path)
        with pytest.raises(DataError, match="cannot read samples"):
            load_sample_labels(tmp_path)
