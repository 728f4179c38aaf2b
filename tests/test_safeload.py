"""No weights file runs code (issue 21): for every path that reads weights, a file whose pickle would
create a marker file when unpickled (a plain pickle, a torch zip and a legacy torch file) is refused in
one line, and the marker is never made. Valid weights still load."""

import json
import os
import pickle
import shlex
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddpm import inception, safeload
from ddpm.cli import main
from ddpm.errors import CheckpointError, DataError

FORMATS = ["pickle-p2", "pickle-p5", "torch-zip", "torch-legacy"]


class Payload:
    """Unpickled, it runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def write_payload(path, fmt, marker, tensors=None):
    """A weights file in ``fmt`` holding a state dict whose extra entry runs code when unpickled."""
    state = {**(tensors or {"fc.weight": torch.zeros(2)}), "hook": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt.startswith("pickle"):
        path.write_bytes(pickle.dumps({"hook": Payload(marker)}, protocol=int(fmt[-1])))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "torch-zip")
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a weights file ran code"


def refused(argv, capsys, *words):
    """The command exits 2 with one line naming the problem and no traceback."""
    capsys.readouterr()  # what setting up wrote
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def one_line(excinfo, *words):
    text = str(excinfo.value)
    assert "\n" not in text, text
    for word in words:
        assert word in text, text


def samples_dir(tmp_path, channels=3, size=32, n=4):
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "samples.npz", arr_0=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8))
    return folder


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_payloads_do_run_code_when_unpickled_unsafely(tmp_path, fmt):
    """The files the other tests refuse are live: unpickled as torch-fidelity did, they run code."""
    marker = tmp_path / "ran"
    path = write_payload(tmp_path / "w.pth", fmt, marker)
    try:
        if fmt.startswith("pickle"):
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
    except Exception:
        pass
    assert marker.exists()


# Inception: --inception-weights, the torch hub cache, the download


@pytest.mark.parametrize("fmt", FORMATS)
def test_inception_weights_that_hold_code_are_refused_unread(tmp_path, capsys, marker, fmt):
    weights = write_payload(tmp_path / "w" / inception.WEIGHTS_NAME, fmt, marker)
    argv = ["eval", "fid", str(samples_dir(tmp_path)), "--extractor", "inception", "--dataset", "cifar10"]
    argv += ["--inception-weights", str(weights), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    refused(argv, capsys, str(weights), "refused unread")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache where downloading fails the test."""

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_poisoned_torch_hub_cache_is_refused_unread(tmp_path, torch_home, capsys, marker, fmt):
    cached = write_payload(torch_home / "hub" / "checkpoints" / inception.WEIGHTS_NAME, fmt, marker)
    assert inception.hub_weights_path() == cached  # where torch.hub / torch-fidelity look
    argv = ["eval", "fid", str(samples_dir(tmp_path)), "--extractor", "inception", "--dataset", "cifar10"]
    refused(argv + ["--no-progress"], capsys, "not the published", "delete it")


@pytest.mark.parametrize("fmt", ["pickle-p2", "torch-zip"])
def test_a_planted_cache_file_that_passes_the_hash_is_still_read_as_tensors_only(
    torch_home, monkeypatch, marker, fmt
):
    cached = write_payload(torch_home / "hub" / "checkpoints" / inception.WEIGHTS_NAME, fmt, marker)
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", safeload.sha256_file(cached)[:8])
    with pytest.raises(DataError) as e:
        inception.load_inception(None)
    one_line(e, "torch hub cache", "refused unread")


def test_a_download_that_is_not_the_published_file_is_refused(tmp_path, monkeypatch, marker):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(
        torch.hub,
        "download_url_to_file",
        lambda url, dst, *a, **k: write_payload(Path(dst), "torch-zip", marker),
    )
    with pytest.raises(DataError) as e:
        inception.load_inception(None, progress=False)
    one_line(e, "not the published", "delete it")


def test_valid_weights_load_from_the_hub_cache_and_from_safetensors(
    inception_weights, torch_home, tmp_path, monkeypatch, capsys
):
    state = torch.load(inception_weights, weights_only=True)
    cached = torch_home / "hub" / "checkpoints" / inception.WEIGHTS_NAME
    cached.parent.mkdir(parents=True)
    shutil.copy(inception_weights, cached)
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", safeload.sha256_file(cached)[:8])  # as if published

    loads = []
    real_load = torch.load

    def watched_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def hub_loader(*args, **kwargs):
        raise AssertionError("torch-fidelity loaded its own weights")

    with (
        mock.patch("torch.load", watched_load),
        mock.patch("torch.hub.load_state_dict_from_url", hub_loader),
    ):
        model = inception.load_inception(None)
    assert loads == [True]  # read once, by ddpm, with the weights-only unpickler
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert capsys.readouterr().err == ""

    # --inception-weights may be a safetensors copy; a user's file under the published name but with
    # other contents loads, with a warning
    mine = tmp_path / "mine" / inception.WEIGHTS_NAME
    mine.parent.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(mine))
    model = inception.load_inception(mine)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ddpm: warning:") and "sha256" in line


def test_a_torch_fidelity_that_builds_differently_is_refused(inception_weights, monkeypatch):
    monkeypatch.delattr(sys.modules[inception._inception_class().__module__], "load_state_dict_from_url")
    with pytest.raises(DataError, match="cannot be loaded safely"):
        inception.load_inception(inception_weights)


def test_damaged_reference_statistics_are_refused(tmp_path, monkeypatch, marker):
    features = np.random.default_rng(0).normal(size=(20, 4))
    monkeypatch.setattr(inception, "load_dataset", lambda cfg: mock.Mock(data=torch.zeros(20, 3, 8, 8)))
    monkeypatch.setattr(inception, "inception_outputs", lambda *a, **k: (features, None))
    args = (None, "cifar10", "train", None, 8, None, tmp_path)
    inception.reference_statistics(*args, progress=False)
    (path,) = tmp_path.glob("*.npz")
    np.savez(path, mu=np.array([Payload(marker)], dtype=object))
    with pytest.raises(DataError) as e:
        inception.reference_statistics(*args, progress=False)
    one_line(e, "delete the file")


# torch files read by ddpm itself: the loader's own guarantees


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_loader_refuses_code_and_names_what_it_would_have_called(tmp_path, marker, fmt):
    path = write_payload(tmp_path / "w.pth", fmt, marker)
    with pytest.raises(CheckpointError) as e:
        safeload.load_state_dict(path, "w.pth", error=CheckpointError)
    one_line(e, "w.pth was refused unread")
    if fmt != "pickle-p5":  # protocol 5's framing is refused before the call is reached
        one_line(e, "system")


def test_before_torch_2_6_pickled_weights_are_not_read_at_all(tmp_path, monkeypatch):
    state = {"w": torch.arange(3.0)}
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(DataError, match=r"torch>=2\.6"):
        safeload.load_state_dict(tmp_path / "w.pth", "w.pth")
    assert torch.equal(safeload.load_state_dict(tmp_path / "w.safetensors", "w")["w"], state["w"])
    monkeypatch.setattr(torch, "__version__", "2.6.0+cpu")
    assert torch.equal(safeload.load_state_dict(tmp_path / "w.pth", "w.pth")["w"], state["w"])


# transformers folders: text encoders and CLIP scorers


@pytest.fixture(scope="module")
def clip_text_folder(tmp_path_factory):
    from test_encoders import tiny_clip_text

    return tiny_clip_text(tmp_path_factory.mktemp("clip-text"))


def pickled_copy(folder, dest, weights, bin_name, fmt, marker, keep_safetensors=False):
    shutil.copytree(folder, dest)
    if not keep_safetensors:
        (dest / weights).unlink()
    write_payload(dest / bin_name, fmt, marker)
    return dest


@pytest.mark.parametrize("fmt", ["pickle-p2", "torch-zip"])
def test_a_transformers_text_encoder_with_pickled_weights_is_refused(clip_text_folder, tmp_path, marker, fmt):
    from ddpm.encoders import load_text_encoder

    folder = pickled_copy(
        clip_text_folder, tmp_path / "enc", "model.safetensors", "pytorch_model.bin", fmt, marker
    )
    with pytest.raises(DataError) as e:
        load_text_encoder(folder)
    one_line(e, "pytorch_model.bin, a pickle", "does not load")


def test_a_transformers_folder_with_safetensors_never_reads_its_pickle(clip_text_folder, tmp_path, marker):
    from ddpm.encoders import load_text_encoder

    folder = pickled_copy(
        clip_text_folder,
        tmp_path / "enc",
        "model.safetensors",
        "pytorch_model.bin",
        "torch-zip",
        marker,
        True,
    )
    assert load_text_encoder(folder).encode(["a coat"]).tokens.shape[-1] == 24


def test_a_pickle_named_like_safetensors_is_refused_in_one_line(clip_text_folder, tmp_path, capsys, marker):
    from test_latent import tiny_diffusers_autoencoder
    from test_text_metrics import tiny_clip

    from ddpm.encoders import load_text_encoder
    from ddpm.latent import load_autoencoder

    folder = shutil.copytree(clip_text_folder, tmp_path / "enc")
    write_payload(folder / "model.safetensors", "torch-zip", marker)
    with pytest.raises(DataError) as e:
        load_text_encoder(folder)
    one_line(e, "cannot load text encoder")

    clip = tiny_clip(tmp_path / "clip")
    write_payload(clip / "model.safetensors", "pickle-p2", marker)
    refused(["eval", "text", str(tmp_path), "--clip-model", str(clip)], capsys, "cannot load CLIP model")

    vae = tiny_diffusers_autoencoder(tmp_path / "vae")
    write_payload(vae / "diffusion_pytorch_model.safetensors", "torch-zip", marker)
    with pytest.raises(DataError) as e:
        load_autoencoder(vae)
    one_line(e, "cannot be loaded")


def test_a_transformers_folder_with_no_weights_is_one_line(clip_text_folder, tmp_path):
    from ddpm.encoders import load_text_encoder

    folder = shutil.copytree(clip_text_folder, tmp_path / "enc")
    (folder / "model.safetensors").unlink()
    with pytest.raises(DataError) as e:
        load_text_encoder(folder)
    one_line(e, "cannot load text encoder")


@pytest.mark.parametrize("fmt", ["pickle-p2", "torch-zip"])
def test_a_clip_scorer_with_pickled_weights_is_refused(tmp_path, capsys, marker, fmt):
    from test_text_metrics import tiny_clip

    folder = tiny_clip(tmp_path / "clip")
    (folder / "model.safetensors").unlink()
    write_payload(folder / "pytorch_model.bin", fmt, marker)
    argv = ["eval", "text", str(tmp_path), "--clip-model", str(folder), "--no-progress"]
    refused(argv, capsys, "pytorch_model.bin, a pickle")


# diffusers folders: `ddpm import` and AutoencoderKL


@pytest.mark.parametrize("fmt", FORMATS)
def test_ddpm_import_refuses_a_pickled_unet_that_holds_code(tmp_path, capsys, marker, fmt):
    from test_convert import good_unet_config

    unet = tmp_path / "pipe" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps(good_unet_config()))
    write_payload(unet / "diffusion_pytorch_model.bin", fmt, marker, {"conv_in.weight": torch.zeros(1)})
    argv = ["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run")]
    refused(argv, capsys, "cannot read the weights in", "refused unread")


@pytest.mark.parametrize("fmt", ["pickle-p2", "torch-zip"])
def test_a_diffusers_autoencoder_with_pickled_weights_is_refused(tmp_path, marker, fmt):
    from test_latent import tiny_diffusers_autoencoder

    from ddpm.latent import load_autoencoder

    folder = tiny_diffusers_autoencoder(tmp_path / "vae")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    write_payload(folder / "diffusion_pytorch_model.bin", fmt, marker)
    with pytest.raises(DataError) as e:
        load_autoencoder(folder)
    one_line(e, "diffusion_pytorch_model.bin, a pickle")


# ddpm's own files: checkpoints, the domain classifier cache, domain text encoders, samples


@pytest.mark.parametrize("fmt", ["pickle-p2", "torch-zip"])
def test_a_checkpoint_that_is_a_pickle_is_refused(tmp_path, capsys, marker, fmt):
    run = tmp_path / "run"
    write_payload(run / "checkpoint.safetensors", fmt, marker)
    refused(
        ["sample", str(run), "--num", "1", "--out", str(tmp_path / "s")], capsys, "not a safetensors file"
    )
    ckpt = write_payload(tmp_path / "model.safetensors", fmt, marker)
    refused(
        ["sample", str(ckpt), "--num", "1", "--out", str(tmp_path / "s")], capsys, "not a safetensors file"
    )


@pytest.mark.parametrize("fmt", ["pickle-p2", "torch-zip"])
def test_a_poisoned_domain_classifier_cache_is_refused(tmp_path, capsys, marker, fmt):
    from ddpm.metrics import classifier_path

    cache = tmp_path / "cache"
    write_payload(classifier_path("fashion-mnist", 8, cache), fmt, marker)
    argv = ["eval", "fid", str(samples_dir(tmp_path, channels=1, size=8)), "--extractor", "domain"]
    argv += ["--dataset", "fashion-mnist", "--cache-dir", str(cache), "--no-progress"]
    refused(argv, capsys, "domain classifier", "delete it")


def test_a_domain_text_encoder_with_pickled_weights_is_refused(tmp_path, marker):
    from test_encoders import domain_encoder

    from ddpm.encoders import load_text_encoder

    folder = domain_encoder(tmp_path / "enc")
    write_payload(folder / "model.safetensors", "torch-zip", marker)
    with pytest.raises(DataError) as e:
        load_text_encoder(folder)
    one_line(e, "is damaged")


def test_samples_that_are_pickles_are_refused(tmp_path, capsys, marker):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "samples.npz").write_bytes(pickle.dumps({"arr_0": Payload(marker)}))
    refused(
        ["eval", "fid", str(folder), "--dataset", "cifar10", "--no-progress"], capsys, "cannot read samples"
    )
    np.savez(folder / "samples.npz", arr_0=np.array([Payload(marker)], dtype=object))
    refused(
        ["eval", "fid", str(folder), "--dataset", "cifar10", "--no-progress"], capsys, "cannot read samples"
    )


def test_an_error_is_quoted_in_one_line_even_without_a_message():
    from ddpm.errors import first_line

    assert first_line(RuntimeError("\x1b[31mbad\x1b[0m file\nmore")) == "bad file"
    assert first_line(KeyError()) == "KeyError" and first_line(ValueError("  ")) == "ValueError"
