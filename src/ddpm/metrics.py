"""Sample-quality metrics from features: FID, KID and an Inception-Score analogue.

For small grayscale datasets (Fashion-MNIST, MNIST) Inception features are a poor fit, so the
"domain" extractor is a small CNN classifier trained on the dataset itself; numbers computed with it
are labelled `domain-<dataset>` and are not comparable with Inception FIDs.
Samples are always quantised to uint8 first, as the paper did.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import DataConfig
from .data import CACHE, BatchOrder, load_dataset, load_idx_dataset, match_images
from .errors import DataError
from .files import atomic_write, parse_json
from .images import to_model_range

CLASSIFIER_VERSION = 1


# ---- statistics ----


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise DataError(f"need at least 2 feature vectors, got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def psd_sqrt(sigma) -> np.ndarray:
    """The symmetric square root of a covariance (negative rounding-error eigenvalues taken as 0)."""
    w, v = np.linalg.eigh(np.atleast_2d(sigma))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma1=None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians.

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum and avoids a non-symmetric sqrtm.
    ``sqrt_sigma1``: S1^(1/2) where the caller has it (``psd_sqrt``), for many distances to one S1.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    sqrt_s1 = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    cross = np.linalg.eigvalsh(sqrt_s1 @ sigma2 @ sqrt_s1)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_to_features(features: np.ndarray, mu, sigma, sqrt_sigma) -> float:
    """``frechet_distance`` from the Gaussian (``mu``, ``sigma``, its root ``sqrt_sigma``) to the features
    [N, D] (float64) without forming their D x D covariance C = X'X / (N - 1), X the centred features:
    S^(1/2) C S^(1/2) = Y'Y with Y = X S^(1/2) / sqrt(N - 1), whose nonzero eigenvalues are those of the
    N x N matrix YY'. The smaller of the two is decomposed, so a bootstrap of N < D samples (a quick
    Inception screen) costs N^3, not D^3."""
    n, d = features.shape
    if n < 2:
        raise DataError(f"need at least 2 feature vectors, got shape {features.shape}")
    centred = (features - features.mean(0)) / math.sqrt(n - 1)
    y = centred @ sqrt_sigma
    cross = np.linalg.eigvalsh(y @ y.T if n < d else y.T @ y)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = features.mean(0) - np.atleast_1d(mu)
    return float(diff @ diff + np.trace(np.atleast_2d(sigma)) + (centred**2).sum() - 2 * trace_sqrt)


# Resamples behind a FID's standard error: the estimate's own relative error is about 1 / sqrt(2 (B - 1)),
# 10% at 50, and each resample costs one FID (milliseconds for the domain classifier's 128 features,
# about half a second for Inception's 2048 at N >= 2048, the reference's root computed once).
FID_RESAMPLES = 50
Z_95 = 1.959964  # the standard normal's 97.5% quantile: a two-sided 95% interval


def fid_uncertainty(
    features: np.ndarray,
    ref_mu,
    ref_sigma,
    fid: float,
    resamples: int = FID_RESAMPLES,
    seed: int = 0,
    progress: bool = False,
    sqrt_ref=None,
) -> dict:
    """How much the FID of ``features`` (the samples) against a reference Gaussian moves with the samples
    drawn: the standard deviation of the FID over ``resamples`` bootstrap resamples of the samples (drawn
    with replacement, seeded), and the normal 95% interval fid +- 1.96 se around the estimate. The bootstrap
    stands in for drawing the samples again with another seed (tests/test_metrics.py checks it against
    that); the reference's own noise and the training run's are not in it. ``sqrt_ref``:
    ``psd_sqrt(ref_sigma)`` where the caller has it."""
    if resamples < 2:
        raise DataError(f"resamples must be at least 2, got {resamples}", field="resamples")
    features = np.asarray(features, np.float64)
    rng = np.random.default_rng(seed)
    n = len(features)
    if sqrt_ref is None:  # (the distance is symmetric: the reference's root serves every resample)
        sqrt_ref = psd_sqrt(ref_sigma)
    from tqdm.auto import tqdm

    values = [
        frechet_distance_to_features(features[rng.integers(0, n, n)], ref_mu, ref_sigma, sqrt_ref)
        for _ in tqdm(range(resamples), desc="FID bootstrap", unit="resample", disable=not progress)
    ]
    se = float(np.std(values, ddof=1))
    return {
        "fid_se": round(se, 4),
        "fid_interval": [round(max(fid - Z_95 * se, 0.0), 4), round(fid + Z_95 * se, 4)],  # a FID is >= 0
        "fid_interval_method": f"95% normal; the standard error over {resamples} bootstrap resamples",
    }


def other_split(split: str) -> str:
    """Where the real-data floor draws its images: the split that is not the reference."""
    return "train" if split == "test" else "test"


def real_floor(
    features_of, real_uint8: torch.Tensor, num: int, ref_stats, seed: int = 0, sqrt_ref=None
) -> dict:
    """The FID that ``num`` real images reach against the reference (``ref_stats``: its mean and
    covariance): what a perfect model's ``num`` samples would score, the floor a FID at that count is read
    against. ``features_of`` maps uint8 images to features; the images are ``num`` of ``real_uint8`` (the
    other split) picked by a seeded permutation, or all of them when it holds fewer (``num_images`` says).
    ``sqrt_ref``: ``psd_sqrt`` of the reference's covariance where the caller has it."""
    pick = torch.randperm(len(real_uint8), generator=torch.Generator().manual_seed(seed))[:num]
    mu, sigma = ref_stats
    features = np.asarray(features_of(real_uint8[pick]), np.float64)
    fid = frechet_distance_to_features(features, mu, sigma, psd_sqrt(sigma) if sqrt_ref is None else sqrt_ref)
    return {"fid": round(fid, 4), "num_images": len(pick)}


def kernel_inception_distance(
    f1: np.ndarray, f2: np.ndarray, subsets: int = 10, subset_size: int = 1000, seed=0
):
    """KID: unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, mean and std over subsets."""
    rng = np.random.default_rng(seed)
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def classifier_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """The Inception-Score formula exp(E_x KL(p(y|x) || p(y))) on class probabilities (mean, std
    over splits)."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for part in np.array_split(probs, splits):
        p_y = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(p_y + 1e-12))).sum(1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ---- the domain classifier ----


class DomainClassifier(nn.Module):
    """A small CNN for 28x28-ish images; ``features`` is its 128-d penultimate layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(7),  # keeps the layout at 28x28; makes other sizes work too
            nn.Flatten(),
            nn.Linear(2 * width * 49, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


DOMAIN_DATASETS = ("fashion-mnist", "mnist")


def _labelled_images(dataset: str, root: str | None, split: str, image_size: int):
    if dataset not in DOMAIN_DATASETS:
        raise DataError(f"a domain classifier exists for {', '.join(DOMAIN_DATASETS)}, not {dataset!r}")
    images = match_images(load_idx_dataset(dataset, root, split), image_size, None)
    labels = load_idx_dataset(dataset, root, split, kind="labels")
    if len(images) != len(labels):
        raise DataError(f"{dataset} {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


@torch.no_grad()
def classify(model: DomainClassifier, images_uint8: torch.Tensor, batch_size: int = 1000):
    """Features [N, 128] and class probabilities [N, K] of uint8 images, as float64 numpy arrays."""
    model.eval()
    feats, probs = [], []
    for start in range(0, len(images_uint8), batch_size):
        x = to_model_range(images_uint8[start : start + batch_size])
        f = model.features(x)
        feats.append(f.double().numpy())
        probs.append(F.softmax(model.head(f), dim=1).double().numpy())
    return np.concatenate(feats), np.concatenate(probs)


def train_classifier(
    dataset: str = "fashion-mnist",
    root: str | None = None,
    image_size: int = 28,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[DomainClassifier, dict]:
    """Train the domain classifier on the train split (seeded); report its test accuracy."""
    if epochs <= 0 or batch_size <= 0:
        raise DataError("classifier epochs and batch size must be positive")
    images, labels = _labelled_images(dataset, root, "train", image_size)
    torch.manual_seed(seed)
    model = DomainClassifier(in_channels=images.shape[1], num_classes=int(labels.max()) + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = BatchOrder(len(images), batch_size, seed)
    steps = epochs * math.ceil(len(images) / batch_size)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"classifier ({dataset})", unit="step")
    model.train()
    for step in iterator:
        idx = order.indices(step)
        loss = F.cross_entropy(model(to_model_range(images[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    test_images, test_labels = _labelled_images(dataset, root, "test", image_size)
    _, probs = classify(model, test_images)
    accuracy = float((probs.argmax(1) == test_labels.numpy()).mean())
    info = {
        "format": "ddpm-domain-classifier",
        "version": CLASSIFIER_VERSION,
        "dataset": dataset,
        "image_size": image_size,
        "channels": images.shape[1],
        "num_classes": int(labels.max()) + 1,
        "epochs": epochs,
        "seed": seed,
        "test_accuracy": round(accuracy, 4),
    }
    return model.eval(), info


def classifier_path(dataset: str, image_size: int, cache_dir: str | Path | None = None) -> Path:
    base = Path(cache_dir) if cache_dir else CACHE / "classifiers"
    return base / f"{dataset}-{image_size}px-v{CLASSIFIER_VERSION}.safetensors"


def save_classifier(model: DomainClassifier, info: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"info": json.dumps(info)}))


def load_classifier(path: Path) -> tuple[DomainClassifier, dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            info = parse_json((f.metadata() or {})["info"], "its info", expect=dict)
        state = load_file(str(path))
        model = DomainClassifier(info["channels"], info["num_classes"])
        model.load_state_dict(state)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, DataError) as e:
        raise DataError(f"domain classifier {path} is damaged ({e}); delete it to retrain") from None
    return model.eval(), info


def domain_classifier(
    dataset: str, root: str | None = None, image_size: int = 28, cache_dir=None, progress: bool = True
) -> tuple[DomainClassifier, dict]:
    """The cached classifier for ``dataset``, trained on first use."""
    path = classifier_path(dataset, image_size, cache_dir)
    if path.is_file():
        return load_classifier(path)
    model, info = train_classifier(dataset, root, image_size, progress=progress)
    save_classifier(model, info, path)
    return model, info


def evaluate_domain(
    samples_uint8: torch.Tensor,
    dataset: str = "fashion-mnist",
    split: str = "test",
    root: str | None = None,
    cache_dir=None,
    progress: bool = True,
    labels: torch.Tensor | None = None,
    class_names: list[str] | None = None,
    resamples: int = FID_RESAMPLES,
) -> dict:
    """Domain FID, KID and classifier score of uint8 samples against a reference split, the FID with its
    uncertainty (``fid_uncertainty`` over ``resamples``) and the real-data floor at the same count
    (``real_floor``); with ``labels`` (the class each sample was conditioned on) also how often the
    classifier recognises that class."""
    if samples_uint8.dtype != torch.uint8:
        raise DataError("samples must be quantised to uint8 before evaluation")
    size = samples_uint8.shape[-1]
    if dataset in DOMAIN_DATASETS and samples_uint8.shape[1] != 1:  # before a classifier is trained for them
        raise DataError(f"samples have {samples_uint8.shape[1]} channels; {dataset} is grayscale (1)")
    model, info = domain_classifier(dataset, root, size, cache_dir, progress)
    if samples_uint8.shape[1] != info["channels"]:
        raise DataError(f"samples have {samples_uint8.shape[1]} channels; {dataset} has {info['channels']}")
    reference = load_dataset(DataConfig(dataset=dataset, root=root, image_size=size, split=split)).data
    f_samples, p_samples = classify(model, samples_uint8)
    f_ref, _ = classify(model, reference)
    ref_stats = feature_statistics(f_ref)
    fid = frechet_distance(*feature_statistics(f_samples), *ref_stats)
    uncertainty = fid_uncertainty(f_samples, *ref_stats, fid, resamples, progress=progress)
    real = load_dataset(DataConfig(dataset=dataset, root=root, image_size=size, split=other_split(split)))
    floor = real_floor(lambda images: classify(model, images)[0], real.data, len(samples_uint8), ref_stats)
    kid_mean, kid_std = kernel_inception_distance(f_samples, f_ref)
    score_mean, score_std = classifier_score(p_samples, splits=min(10, len(p_samples)))
    agreement = {}
    if labels is not None:
        agreement = {"class_agreement": class_agreement(p_samples, labels, class_names)}
    return {
        "extractor": f"domain-{dataset}-cnn-v{CLASSIFIER_VERSION}",
        "extractor_test_accuracy": info["test_accuracy"],
        "reference": {"dataset": dataset, "split": split, "num_images": len(reference)},
        "num_samples": len(samples_uint8),
        "fid": round(fid, 4),
        **uncertainty,
        "real_floor": {**floor, "split": other_split(split)},
        "kid": round(kid_mean, 6),
        "kid_std": round(kid_std, 6),
        "classifier_score": round(score_mean, 4),
        "classifier_score_std": round(score_std, 4),
        **agreement,
    }


def class_agreement(probs: np.ndarray, labels: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """How often the classifier's top class is the one each sample was conditioned on: overall (the
    mean over samples) and per class (with each class's sample count)."""
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if len(labels) != len(probs):
        raise DataError(f"{len(labels)} labels for {len(probs)} samples")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise DataError(f"sample labels must be class ids in 0..{probs.shape[1] - 1}")
    hits = probs.argmax(1) == labels
    per_class = {}
    for c in np.unique(labels):
        name = class_names[c] if class_names and c < len(class_names) else str(int(c))
        per_class[name] = {
            "agreement": round(float(hits[labels == c].mean()), 4),
            "samples": int((labels == c).sum()),
        }
    return {"overall": round(float(hits.mean()), 4), "per_class": per_class}
