"""FID, Inception Score and KID with the standard Inception network (torch-fidelity's TF-compatible
InceptionV3, the 2015-12-05 weights the paper's FIDs were computed with), on uint8 images.

Reference statistics (mean and covariance of the 2048-d pool features, plus a fixed random subset of
10,000 feature vectors for KID) are cached on disk per dataset, split, size and weights file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import types
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .data import CACHE, load_dataset
from .errors import DataError, first_line
from .files import read_json, write_json
from .metrics import (
    FID_RESAMPLES,
    classifier_score,
    feature_statistics,
    fid_uncertainty,
    frechet_distance_to_features,
    kernel_inception_distance,
    other_split,
    psd_sqrt,
    real_floor,
)
from .safeload import load_state_dict, sha256_file

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
WEIGHTS_SHA256 = "6726825d"  # the published file's sha256 starts so, as torch.hub names such files
FEATURES = ("2048", "logits_unbiased")
KID_REFERENCE_SUBSET = 10_000
STATS_VERSION = 1


def _inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3.

    torch-fidelity's package ``__init__`` imports torchvision (for its dataset wrappers and the VGG/CLIP
    extractors), and no torchvision matches the CPU torch wheel this project installs here. The
    Inception extractor and the helpers it imports need none of it, so when the normal import fails on
    torchvision the package is registered without running its ``__init__`` (its other entry points,
    such as calculate_metrics, are then unavailable in this process) and the one module is imported.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    except ModuleNotFoundError as e:
        if e.name == "torch_fidelity":
            raise DataError(
                "Inception FID needs torch-fidelity: `pip install --no-deps torch-fidelity`"
            ) from None
    except (ImportError, RuntimeError):  # torchvision broken or built for another torch
        pass
    spec = importlib.util.find_spec("torch_fidelity")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[name]  # half-imported by the failed attempt
    sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def hub_weights_path() -> Path:
    """Where torch.hub, and so torch-fidelity, keeps the downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def _published_weights(progress: bool) -> Path:
    """The published weights file in torch's hub cache, downloaded on first use; its sha256 must start
    with the prefix in its name (torch.hub's convention), so a damaged or swapped file is refused before
    it is read. A 32-bit prefix is an integrity check, not a defence: what keeps a planted file from
    running code is that it is read as tensors only (``load_state_dict``)."""
    path = hub_weights_path()
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.redirect_stdout(sys.stderr):
                torch.hub.download_url_to_file(WEIGHTS_URL, str(path), WEIGHTS_SHA256, progress=progress)
        except (urllib.error.URLError, OSError, ConnectionError) as e:
            raise DataError(
                f"cannot download the Inception weights ({getattr(e, 'reason', e)}); offline, pass "
                f"inception_weights=PATH, a local copy of {WEIGHTS_NAME}",
                field="inception_weights",
            ) from None
        except RuntimeError as e:  # torch.hub: the download's hash is not the published one
            raise DataError(f"the downloaded {WEIGHTS_NAME} is not the published file ({e})") from None
    digest = sha256_file(path)
    if not digest.startswith(WEIGHTS_SHA256):
        raise DataError(
            f"{path} (torch hub cache) is not the published {WEIGHTS_NAME}: its sha256 starts "
            f"{digest[:8]}, not {WEIGHTS_SHA256}; delete it to download it again"
        )
    return path


@contextlib.contextmanager
def _weights_given(cls, state: dict):
    """torch-fidelity's constructor loads its own weights (with ``torch.load(weights_only=False)`` for a
    path, or torch.hub's loader): for the duration, its hub loader hands over ``state`` instead."""
    module = sys.modules[cls.__module__]
    if not callable(getattr(module, "load_state_dict_from_url", None)):
        raise DataError(
            f"this torch-fidelity ({module.__name__}) builds its Inception network in a way ddpm does not "
            "know, so its weights cannot be loaded safely; install torch-fidelity 0.3 or 0.4"
        )
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def load_inception(weights: str | Path | None = None, device="cpu", progress: bool = True) -> torch.nn.Module:
    """The Inception network; ``weights`` is a local copy of torch-fidelity's weights file (or a
    safetensors copy of it), else the published file is downloaded on first use (to torch's hub cache)
    and checked against its hash. Either is read as tensors only (never unpickled with code)."""
    cls = _inception_class()
    if weights is None:
        path, source = _published_weights(progress), f"the downloaded {WEIGHTS_NAME} (torch hub cache)"
    else:
        path, source = Path(weights), str(weights)
        if not path.is_file():
            raise DataError(f"weights: no file at {weights}", field="weights")
    state = load_state_dict(path, source, "an InceptionV3 state dict for torch-fidelity")
    try:
        with _weights_given(cls, state):
            model = cls("inception-v3-compat", list(FEATURES))
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        # wrong or missing tensors, or tensors of other shapes
        raise DataError(
            f"{source} is not an InceptionV3 state dict for torch-fidelity ({first_line(e)})"
        ) from None
    if weights is not None and path.name == WEIGHTS_NAME and not sha256_file(path).startswith(WEIGHTS_SHA256):
        # a user's own file may be fine (it is named by its hash in results), but not under this name
        print(
            f"ddpm: warning: {weights} is named like the published weights but its sha256 does not "
            f"start {WEIGHTS_SHA256}; its scores are not comparable with published ones",
            file=sys.stderr,
        )
    return model.to(device)


@torch.inference_mode()
def inception_outputs(model, images_uint8: torch.Tensor, batch_size: int = 200, progress: bool = False):
    """Pool features [N, 2048] and class probabilities [N, 1008] (float64 numpy) of uint8 images
    [N, C, H, W]; grayscale is repeated to RGB, resizing to 299 happens inside the network."""
    if images_uint8.dtype != torch.uint8:
        raise DataError("images must be quantised to uint8 before evaluation")
    if images_uint8.shape[1] not in (1, 3):
        raise DataError(f"Inception needs 1 or 3 channels, got {images_uint8.shape[1]}")
    device = next(model.parameters()).device
    features, probs = [], []
    batches = range(0, len(images_uint8), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="inception", unit="batch", leave=False)
    for i in batches:
        x = images_uint8[i : i + batch_size].to(device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pool, logits = model(x)
        features.append(pool.double().cpu())
        probs.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.cat(features).numpy(), torch.cat(probs).numpy()


def weights_id(weights: str | Path | None) -> str:
    """Names the weights in cache keys and results: the official file, or a hash of a local one."""
    if weights is None:
        return WEIGHTS_NAME
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]
    return f"{Path(weights).name}-sha256-{digest}"


def reference_statistics(
    model, dataset: str, split: str, root, image_size: int, weights, cache_dir=None, progress=True
) -> dict:
    """Mean, covariance and a KID subset of the reference split's Inception features, cached."""
    cache_dir = Path(cache_dir) if cache_dir else CACHE / "reference_stats"
    wid = weights_id(weights)
    key = hashlib.sha256(json.dumps([STATS_VERSION, dataset, split, str(root), image_size, wid]).encode())
    path = cache_dir / f"{dataset}-{split}-{image_size}px-{key.hexdigest()[:12]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"reference statistics {path} are damaged ({e}); delete the file") from None
    images = load_dataset(DataConfig(dataset=dataset, root=root, image_size=image_size, split=split)).data
    features, _ = inception_outputs(model, images, progress=progress)
    mu, sigma = feature_statistics(features)
    rng = np.random.default_rng(0)
    subset = features[rng.choice(len(features), min(KID_REFERENCE_SUBSET, len(features)), replace=False)]
    stats = {"mu": mu, "sigma": sigma, "kid_features": subset.astype(np.float32), "num_images": len(images)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # concurrent runs never share a temporary file
    np.savez(tmp, **stats)
    tmp.replace(path)  # whole file or nothing, so a killed run never leaves half a cache entry
    return stats


def floor_statistics(
    model,
    dataset: str,
    split: str,
    root,
    image_size: int,
    weights,
    num: int,
    ref: dict,
    cache_dir=None,
    progress=True,
    sqrt_ref=None,
) -> dict:
    """The real-data floor of an Inception FID at ``num`` samples (``ddpm.metrics.real_floor``: ``num``
    images of the other split against ``split``'s statistics ``ref``), cached beside the reference
    statistics: it costs as many Inception passes as the samples did."""
    cache_dir = Path(cache_dir) if cache_dir else CACHE / "reference_stats"
    other = other_split(split)
    key = json.dumps([STATS_VERSION, dataset, split, other, str(root), image_size, weights_id(weights), num])
    path = cache_dir / f"{dataset}-{split}-floor-{num}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if path.is_file():
        return read_json(path, "the cached real-data floor", expect=dict, error=DataError)
    real = load_dataset(DataConfig(dataset=dataset, root=root, image_size=image_size, split=other)).data
    floor = real_floor(
        lambda images: inception_outputs(model, images, progress=progress)[0],
        real,
        num,
        (ref["mu"], ref["sigma"]),
        sqrt_ref=sqrt_ref,
    )
    floor["split"] = other
    write_json(path, floor)
    return floor


def evaluate_inception(
    samples_uint8: torch.Tensor,
    dataset: str,
    split: str = "train",
    root=None,
    weights=None,
    cache_dir=None,
    device="cpu",
    progress: bool = True,
    resamples: int = FID_RESAMPLES,
) -> dict:
    """Inception FID with its uncertainty and real-data floor (as ``ddpm.metrics.evaluate_domain``), KID
    and Inception Score of uint8 samples against a reference split."""
    model = load_inception(weights, device, progress)
    size = samples_uint8.shape[-1]
    ref = reference_statistics(model, dataset, split, root, size, weights, cache_dir, progress)
    features, probs = inception_outputs(model, samples_uint8, progress=progress)
    # One 2048-wide root, the reference's, serves the FID and every resample (fewer samples than 2048: no
    # 2048-wide decomposition of theirs at all; see frechet_distance_to_features).
    sqrt_ref = psd_sqrt(ref["sigma"])
    fid = frechet_distance_to_features(np.asarray(features, np.float64), ref["mu"], ref["sigma"], sqrt_ref)
    uncertainty = fid_uncertainty(
        features, ref["mu"], ref["sigma"], fid, resamples, progress=progress, sqrt_ref=sqrt_ref
    )
    floor = floor_statistics(
        model, dataset, split, root, size, weights, len(features), ref, cache_dir, progress, sqrt_ref
    )
    # torch-fidelity's defaults: KID over 100 subsets of 1000, IS over 10 splits of the 1008 logits.
    kid_mean, kid_std = kernel_inception_distance(features, ref["kid_features"], subsets=100)
    is_mean, is_std = classifier_score(probs, splits=min(10, len(probs)))
    import torch_fidelity.version as tf_version

    return {
        "extractor": "inception-v3-compat",
        "tool": f"torch-fidelity {tf_version.__version__} InceptionV3, weights {weights_id(weights)}",
        "reference": {"dataset": dataset, "split": split, "num_images": int(ref["num_images"])},
        "num_samples": len(samples_uint8),
        "fid": round(fid, 4),
        **uncertainty,
        "real_floor": floor,
        "kid": round(kid_mean, 6),
        "kid_std": round(kid_std, 6),
        "inception_score": round(is_mean, 4),
        "inception_score_std": round(is_std, 4),
    }
