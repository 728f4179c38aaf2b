"""Inception FID / IS / KID through torch-fidelity's InceptionV3, with a locally saved random-weight
network of the same structure standing in for the official weights (no network here)."""

import json
import urllib.error
from unittest import mock

import numpy as np
import pytest
import torch

from ddpm import inception
from ddpm.cli import main
from ddpm.errors import DataError
from ddpm.metrics import feature_statistics, frechet_distance


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A fake CIFAR-10 binary release: 12 train and 6 test images."""
    root = tmp_path_factory.mktemp("cifar")
    data = root / "cifar-10-batches-bin"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        rows = 4 if i == 1 else 2
        rng.integers(0, 256, size=(rows, 3073), dtype=np.uint8).tofile(data / f"data_batch_{i}.bin")
    rng.integers(0, 256, size=(6, 3073), dtype=np.uint8).tofile(data / "test_batch.bin")
    return root


def test_local_weights_load_into_the_inception_network(inception_weights):
    model = inception.load_inception(inception_weights)
    state = torch.load(inception_weights)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # InceptionV3 with the 1008-way fc
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    features, probs = inception.inception_outputs(model, images)
    assert features.shape == (3, 2048) and probs.shape == (3, 1008)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-9)
    # grayscale is repeated to RGB
    gray = images[:, :1]
    f_gray, _ = inception.inception_outputs(model, gray)
    f_rgb, _ = inception.inception_outputs(model, gray.expand(-1, 3, -1, -1).contiguous())
    np.testing.assert_allclose(f_gray, f_rgb)


def test_offline_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the weights are downloaded
    with mock.patch("torch.hub.download_url_to_file", offline):
        with pytest.raises(DataError, match="offline, pass inception_weights=PATH") as e:
            inception.load_inception(None)
    assert e.value.field == "inception_weights"  # the CLI says --inception-weights


def test_bad_inception_weightss_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="no file"):
        inception.load_inception(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(DataError, match="not an InceptionV3 state dict"):
        inception.load_inception(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(DataError):
        inception.load_inception(garbage)


def test_float_images_are_refused(inception_weights):
    model = inception.load_inception(inception_weights)
    with pytest.raises(DataError, match="uint8"):
        inception.inception_outputs(model, torch.rand(2, 3, 32, 32))


def test_eval_fid_inception_caches_reference_stats(inception_weights, cifar_dir, tmp_path):
    from ddpm.config import DataConfig
    from ddpm.data import load_dataset

    train = load_dataset(DataConfig(dataset="cifar10", root=str(cifar_dir), image_size=32)).data
    assert train.dtype == torch.uint8 and len(train) == 12
    samples = tmp_path / "s"
    samples.mkdir()
    np.savez(samples / "samples.npz", arr_0=train.permute(0, 2, 3, 1).numpy())  # the train set itself
    cache = tmp_path / "cache"
    argv = ["eval", "fid", str(samples), "--dataset", "cifar10", "--split", "train", "--data-dir"]
    argv += [str(cifar_dir), "--inception-weights", str(inception_weights), "--cache-dir", str(cache)]
    argv += ["--resamples", "2"]
    assert main(argv + ["--no-progress"]) == 0
    result = json.loads((samples / "fid-inception-v3-compat-train.json").read_text())
    assert result["extractor"] == "inception-v3-compat" and "torch-fidelity" in result["tool"]
    assert result["reference"] == {"dataset": "cifar10", "split": "train", "num_images": 12}
    assert abs(result["fid"]) < 1e-3  # a set against itself
    assert "warning" in result  # 12 samples, not the published 50,000
    assert "over 2 bootstrap resamples" in result["fid_interval_method"]
    (stats_file,) = cache.glob("cifar10-train-32px-*.npz")

    # the second run reads the cached statistics, which are those of the train images' features
    model = inception.load_inception(inception_weights)
    features, _ = inception.inception_outputs(model, train)
    with np.load(stats_file) as npz:
        mu, sigma = feature_statistics(features)
        np.testing.assert_allclose(npz["mu"], mu, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(npz["sigma"], sigma, rtol=1e-5, atol=1e-8)
    test_images = load_dataset(
        DataConfig(dataset="cifar10", root=str(cifar_dir), image_size=32, split="test")
    ).data
    np.savez(samples / "samples.npz", arr_0=test_images.permute(0, 2, 3, 1).numpy())

    def test_split_only(cfg):  # (the real-data floor at this n reads the test split: not cached yet)
        assert cfg.split == "test", "cache not used"
        return load_dataset(cfg)

    with mock.patch("ddpm.inception.load_dataset", side_effect=test_split_only):
        assert main(argv + ["--no-progress"]) == 0
    result = json.loads((samples / "fid-inception-v3-compat-train.json").read_text())
    f_test, _ = inception.inception_outputs(model, test_images)
    expected = frechet_distance(*feature_statistics(f_test), mu, sigma)
    assert result["fid"] == pytest.approx(expected, rel=1e-4) and result["fid"] > 1e-3


@pytest.mark.parametrize("content", [torch.zeros(3), [1, 2], None])
def test_weights_files_that_are_not_state_dicts_are_one_line_errors(tmp_path, content):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(DataError, match="not an InceptionV3 state dict"):
        inception.load_inception(path)
