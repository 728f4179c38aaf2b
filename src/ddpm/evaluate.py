"""`ddpm eval fid`: FID, KID and an Inception (or classifier) score of samples against a data split,
sampling them from a checkpoint first when given one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_NAME, Checkpoint
from .config import check_run_config
from .data import CLASS_NAMES, DATASETS, TOYS
from .errors import ConfigError, DataError, DDPMError
from .files import DirectoryLock, read_json, write_json
from .images import load_sample_labels, load_samples
from .metrics import DOMAIN_DATASETS, FID_RESAMPLES, evaluate_domain
from .runtime import init_processes, resolve_device
from .safeload import sha256_file
from .sample import SampleOptions, sample_to_dir

# The reference datasets FID can compare images with (the 2-D toys are points, not images).
FID_DATASETS = tuple(d for d in DATASETS if d not in TOYS)
# Sample counts of the published FIDs (the paper: 50,000 for CIFAR-10); elsewhere 10,000.
FID_SAMPLES = {"cifar10": 50_000}
# The Fashion-MNIST / MNIST protocol: comparisons use at least this many samples; fewer are a screening.
COMPARISON_SAMPLES = 5_000
DEFAULT_FID_SAMPLES = 10_000


def is_checkpoint(path: Path) -> bool:
    return path.suffix == ".safetensors" or (path / CHECKPOINT_NAME).is_file()


def check_fid_dataset(dataset: str) -> str:
    """``dataset`` if FID can use it as a reference, else a one-line DataError naming the known ones."""
    if dataset in TOYS:
        raise DataError(f"dataset {dataset} is 2-D points: FID compares images ({', '.join(FID_DATASETS)})")
    if dataset not in FID_DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; eval fid knows {', '.join(FID_DATASETS)}")
    return dataset


def evaluate_fid(
    source: str | Path,
    dataset: str | None = None,
    split: str = "test",
    extractor: str = "auto",
    num: int | None = None,
    sampling: SampleOptions | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    inception_weights: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    resamples: int = FID_RESAMPLES,
) -> tuple[Path | None, dict]:
    """Score ``source``: a samples.npz written by `ddpm sample`, its folder, or a run directory /
    checkpoint, from which ``num`` samples (default: the published count for the dataset) are first
    drawn with ``sampling`` into RUN/fid-samples-N-KEY/ (or reused from there: see sample_cache). The
    reference is ``split`` of ``dataset`` (default: the samples' own, from samples.json). ``extractor``
    "auto" takes the domain classifier for Fashion-MNIST / MNIST and Inception otherwise. Writes the
    result as JSON (``out``, default next to the samples) and returns its path and the result; a
    ``warning`` key says when the count is below the published one. The FID comes with its uncertainty
    (``fid_se``, ``fid_interval``: a bootstrap over ``resamples`` resamples of the samples) and the
    real-data floor at the same count (``real_floor``); a Fashion-MNIST or MNIST score of fewer than
    COMPARISON_SAMPLES samples is marked ``"screening": true``. Under torchrun the processes share the
    sampling and the main one scores; the others return (None, {})."""
    if dataset is not None:  # before anything is loaded, downloaded or sampled
        check_fid_dataset(dataset)
    if resamples < 2:
        raise DataError(f"resamples must be at least 2, got {resamples}", field="resamples")
    if inception_weights is not None and not Path(inception_weights).is_file():  # not after sampling
        raise DataError(f"inception_weights: no file at {inception_weights}", field="inception_weights")
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source} does not exist; give samples.npz, its folder, or a run directory")
    sampling = sampling or SampleOptions()
    if is_checkpoint(source):
        ckpt = Checkpoint(source)
        check_run_config(ckpt.config, f"checkpoint {ckpt.path}")
        dataset = dataset or check_fid_dataset(ckpt.config["data"].get("dataset", "fashion-mnist"))
        num = num if num is not None else FID_SAMPLES.get(dataset, DEFAULT_FID_SAMPLES)
        folder = sample_cache(ckpt, num, sampling)
        if not (folder / "samples.json").is_file():  # else: these very samples were drawn before
            if sample_to_dir(source, folder, sampling, num=num, progress=progress) is None:
                return None, {}  # under torchrun: this process helped sample; the main one scores
        remove_stale_caches(ckpt, folder)  # (once these samples exist: a refused request removes nothing)
        source = folder
    if not init_processes(resolve_device(sampling.device)).is_main:
        return None, {}  # under torchrun only the main process scores (and writes)
    folder = source if source.is_dir() else source.parent
    made = {}
    if (folder / "samples.json").is_file():  # how the samples were made: checkpoint, seed, steps, ...
        made = read_json(folder / "samples.json", expect=dict, strict=False)
    dataset = dataset or check_fid_dataset(made.get("dataset", "fashion-mnist"))
    samples = load_samples(source)
    labels = load_sample_labels(source)  # the class each sample was conditioned on, if any
    if extractor == "auto":
        extractor = "domain" if dataset in DOMAIN_DATASETS else "inception"
    if extractor == "domain":
        names = made.get("class_names") or list(CLASS_NAMES.get(dataset, ()))
        result = evaluate_domain(
            samples, dataset, split, data_dir, cache_dir, progress, labels, names, resamples
        )
    else:
        from .inception import evaluate_inception

        device = resolve_device(sampling.device)
        result = evaluate_inception(
            samples, dataset, split, data_dir, inception_weights, cache_dir, device, progress, resamples
        )
    result = {"metric": "fid", "samples": str(folder), **result}
    if labels is not None and "class_agreement" not in result:
        result["class_agreement"] = f"needs a domain classifier ({', '.join(DOMAIN_DATASETS)})"
    if dataset in DOMAIN_DATASETS and len(samples) < COMPARISON_SAMPLES:
        result["screening"] = True  # too few to compare settings by: at 1,000 the seed moves FID by ~8
    recommended = FID_SAMPLES.get(dataset)
    if recommended and len(samples) < recommended:
        result["warning"] = (
            f"{len(samples)} samples; published {dataset} FIDs use {recommended} (FID is biased upward "
            "at smaller counts, so the numbers are not comparable)"
        )
    if made:
        result["sampling"] = made
    path = Path(out) if out else folder / f"fid-{result['extractor']}-{split}.json"
    write_json(path, result)
    if made.get("checkpoint"):
        log_evaluation(Path(made["checkpoint"]), made, result, split)
    return path, result


CACHE_PREFIX = "fid-samples-"


def sample_cache(ckpt: Checkpoint, num: int, sampling: SampleOptions) -> Path:
    """The folder of a run's FID samples: RUN/fid-samples-N-KEY, KEY a digest of the checkpoint's bytes
    and every sampling setting, so an evaluation with the same ones reuses the samples (complete: their
    samples.json is written last) and one with others draws its own."""
    import dataclasses
    import hashlib

    def value(v):  # a low-res image given as a tensor counts by its bytes
        return (
            hashlib.sha256(v.cpu().numpy().tobytes()).hexdigest() if isinstance(v, torch.Tensor) else str(v)
        )

    settings = {k: v for k, v in dataclasses.asdict(sampling).items() if k not in ("num", "progress")}
    settings |= {"num": num, "checkpoint": sha256_file(ckpt.path)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=value).encode()).hexdigest()[:12]
    return ckpt.path.parent / f"{CACHE_PREFIX}{num}-{key}"


def remove_stale_caches(ckpt: Checkpoint, keep: Path) -> None:
    """Remove the run's sample folders of other checkpoints (an earlier step) and those a killed
    evaluation left unfinished; never ``keep``, a folder another process is writing, nor one whose
    samples did not come from this run."""
    step = ckpt.train_state.get("step")
    for other in sorted(ckpt.path.parent.glob(f"{CACHE_PREFIX}*")):
        if other != keep and other.is_dir() and not other.is_symlink():
            _remove_if_stale(other, ckpt.path, step)


def _remove_if_stale(folder: Path, checkpoint: Path, step) -> None:
    made = folder / "samples.json"
    if made.is_file():
        try:
            record = read_json(made, expect=dict, strict=False)
        except DDPMError:
            return  # not a record ddpm wrote: not ours to remove
        ours = Path(str(record.get("checkpoint", ""))).resolve() == checkpoint.resolve()
        if not ours or record.get("step") == step:
            return  # another source's samples, or this checkpoint's with other settings: kept
    elif any(p.name not in (".lock",) and not p.name.startswith(".partial-") for p in folder.iterdir()):
        return  # not a folder of ddpm's making
    lock = DirectoryLock(folder, "ddpm process writing there")
    try:
        lock.acquire()
    except ConfigError:
        return  # being written now
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        lock.release()


def log_evaluation(checkpoint: Path, made: dict, result: dict, split: str) -> None:
    """The FID of a run's samples into the run's TensorBoard events, at the sampled checkpoint's step,
    under a tag naming how they were drawn (so that settings do not share a curve). A run directory that
    cannot be written (a read-only copy) keeps its events as they are."""
    from .dashboard import Dashboard

    run_dir = checkpoint.parent
    how = f"{made.get('sampler')}-{made.get('steps')}steps-n{result['num_samples']}-{made.get('weights')}"
    if made.get("guidance"):
        how += f"-w{made['guidance']}"
    try:
        config = read_json(run_dir / "config.json", expect=dict, strict=False)
        if not config.get("train", {}).get("tensorboard", True) or not isinstance(made.get("step"), int):
            return
        dashboard = Dashboard(run_dir)
        dashboard.scalars(made["step"], {f"fid-{result['extractor']}-{split}/{how}": result["fid"]}, "eval")
        dashboard.close()
    except (OSError, DDPMError):  # no run directory there now, or one that is not ours to write
        pass
