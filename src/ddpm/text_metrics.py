"""`ddpm eval text`: how well a text-conditional model follows its prompts.

- **Class agreement**: for each sample whose prompt names one class, whether the domain classifier sees
  that class (as `eval fid` does for class-conditional samples).
- **Attribute shift**: prompts that differ only in "dark" / "light" (or "small" / "large") should give
  samples whose measured foreground intensity (or area, `captions.measure`) differs in that direction.
  Per class: the mean of the measure over the "light" samples minus over the "dark" ones; summarised as
  the mean difference and the share of classes where it has the right sign.
- **Domain CLIP score**: the CLIP score with the domain CLIP pair (`ddpm train-text-encoder`); like the
  domain FID it is only comparable with itself.
- **CLIP score**: torchmetrics' formula, 100 x the mean cosine similarity of each image with its text,
  floored at 0 (the floor is applied to the mean, as torchmetrics does), with a transformers CLIP model
  from a local folder (or a hub name).

Each metric comes with its value on real test images with their made captions (the first as many test
images as there are samples), the reference a model can at best reach.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .captions import article
from .checkpoint import Checkpoint
from .config import DataConfig
from .errors import DataError, first_line
from .files import read_json, write_json
from .images import load_samples
from .safeload import TRANSFORMERS_PICKLES, TRANSFORMERS_SAFETENSORS, refuse_pickled_folder
from .text import normalized

ATTRIBUTE_PAIRS = {  # (low word, high word): what captions.measure gives, and its name
    ("dark", "light"): (0, "mean foreground intensity (0..255)"),
    ("small", "large"): (1, "foreground area (share of the image)"),
}
DEFAULT_PER_PROMPT = 20


def attribute_prompts(class_names) -> list[str]:
    """For each class: "a photo of a coat", then with each attribute word ("a photo of a dark coat", ...)."""
    prompts = []
    for name in class_names:
        name = name.lower()
        words = [""] + [f"{w} " for pair in ATTRIBUTE_PAIRS for w in pair]
        prompts += [f"a photo of {article(w + name)} {w}{name}" for w in words]
    return prompts


def _has_phrase(text: str, phrase: str) -> bool:
    """``phrase`` in ``text`` as whole words ("shirt" is not in "t-shirt/top")."""
    return re.search(rf"(?<![\w/-]){re.escape(phrase)}(?![\w/-])", text) is not None


def prompt_class(prompt: str, class_names) -> int | None:
    """The class a prompt names, or None when it names none or several."""
    text = prompt.lower()
    named = [c for c, name in enumerate(class_names) if _has_phrase(text, name.lower())]
    return named[0] if len(named) == 1 else None


def attribute_shift(images_uint8: torch.Tensor, texts: list[str], class_names) -> dict:
    """For each attribute pair: per class, the mean measure of the images whose text has the high word
    (and not the low one) minus that of the images whose text has the low word (and not the high one)."""
    from .captions import measure

    measures = measure(images_uint8)
    classes = [prompt_class(t, class_names) for t in texts]
    result = {}
    for (low, high), (which, description) in ATTRIBUTE_PAIRS.items():
        values = measures[which].double()
        has_low = torch.tensor([_has_phrase(t.lower(), low) for t in texts])
        has_high = torch.tensor([_has_phrase(t.lower(), high) for t in texts])
        per_class = {}
        for c, name in enumerate(class_names):
            of_class = torch.tensor([k == c for k in classes], dtype=torch.bool)
            lo, hi = of_class & has_low & ~has_high, of_class & has_high & ~has_low
            if lo.any() and hi.any():
                per_class[name] = {
                    low: round(values[lo].mean().item(), 4),
                    high: round(values[hi].mean().item(), 4),
                    "difference": round((values[hi].mean() - values[lo].mean()).item(), 4),
                    "samples": [int(lo.sum()), int(hi.sum())],
                }
        differences = [v["difference"] for v in per_class.values()]
        result[f"{low} -> {high}"] = {
            "measure": description,
            "mean_difference": round(sum(differences) / len(differences), 4) if differences else None,
            "classes_in_direction": sum(d > 0 for d in differences),
            "classes": len(differences),
            "per_class": per_class,
        }
    return result


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """torchmetrics' CLIP score of paired rows: max(100 x mean cosine similarity, 0)."""
    cosine = (normalized(image_features.double()) * normalized(text_features.double())).sum(-1)
    return max(100 * cosine.mean().item(), 0.0)


def _features_by_text(encode_text, texts: list[str]) -> torch.Tensor:
    """Each text's features, encoding each distinct text once."""
    distinct = list(dict.fromkeys(texts))
    features = encode_text(distinct)
    row = {t: i for i, t in enumerate(distinct)}
    return features[torch.tensor([row[t] for t in texts])]


@torch.no_grad()
def domain_clip_score(clip, images_uint8: torch.Tensor, texts: list[str], batch_size: int = 500) -> float:
    """The CLIP score with a domain CLIP pair (`ddpm.clip.DomainClip`)."""
    clip.eval()
    images = torch.cat(
        [clip.encode_images(images_uint8[i : i + batch_size]).cpu() for i in range(0, len(texts), batch_size)]
    )
    return clip_score(images, _features_by_text(lambda t: clip.encode_text(t).pooled.cpu(), texts))


class PretrainedClip:
    """A transformers CLIP model (text and vision towers) with its tokenizer and image processor, from a
    local folder or a hub name. Grayscale images are repeated to RGB; the processor resizes them."""

    def __init__(self, name: str | Path):
        try:
            import transformers
        except ImportError:
            raise DataError("the CLIP score needs transformers: pip install transformers") from None
        from safetensors import SafetensorError

        refuse_pickled_folder(name, TRANSFORMERS_SAFETENSORS, TRANSFORMERS_PICKLES, f"CLIP model {name}")
        try:
            # weights from safetensors only, no code from the folder or the hub (trust_remote_code)
            self.model = transformers.CLIPModel.from_pretrained(str(name), use_safetensors=True).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(name), trust_remote_code=False)
            self.processor = transformers.AutoImageProcessor.from_pretrained(
                str(name), trust_remote_code=False
            )
        except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged model.safetensors
            first = first_line(e)
            raise DataError(f"cannot load CLIP model {str(name)!r}: {first}") from None
        self.name = str(name)
        self.max_length = self.model.config.text_config.max_position_embeddings

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        # transformers 5 returns a model output whose pooled, projected features are ``pooler_output``
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def image_features(self, images_uint8: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        rgb = images_uint8.expand(-1, 3, -1, -1) if images_uint8.shape[1] == 1 else images_uint8
        parts = []
        for i in range(0, len(rgb), batch_size):
            pixels = self.processor(images=list(rgb[i : i + batch_size]), return_tensors="pt")
            parts.append(self._tensor(self.model.get_image_features(pixel_values=pixels["pixel_values"])))
        return torch.cat(parts)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        output = self.model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        return self._tensor(output)

    def score(self, images_uint8: torch.Tensor, texts: list[str]) -> float:
        return clip_score(self.image_features(images_uint8), _features_by_text(self.text_features, texts))


def sample_record(folder: Path) -> dict:
    """How a folder's samples were made: the samples.json of `ddpm sample`, or the generator's record in
    the generate.json of `ddpm generate` (a pipeline's images), or {} when there is neither."""
    if (folder / "samples.json").is_file():
        return read_json(folder / "samples.json", expect=dict, strict=False)
    if (folder / "generate.json").is_file():
        return read_json(folder / "generate.json", expect=dict, strict=False).get("generator", {})
    return {}


def sample_prompts(folder: Path, num: int) -> list[str]:
    """Each sample's prompt, from the record `ddpm sample` or `ddpm generate` wrote beside a
    text-conditional model's samples (the prompts split the samples into equal contiguous blocks)."""
    from .conditioning import balanced_classes

    made = sample_record(folder)
    prompts = made.get("prompts")
    if not prompts:
        raise DataError(f"{folder} has no prompts in samples.json; sample a text-conditional run first")
    if made.get("num_samples", num) != num:
        raise DataError(f"{folder}: samples.json is for {made['num_samples']} samples, samples.npz has {num}")
    return [prompts[i] for i in balanced_classes(num, len(prompts)).tolist()]


def evaluate_text(
    source: str | Path,
    per_prompt: int = DEFAULT_PER_PROMPT,
    sampling=None,
    domain_clip: str | Path | None = None,
    clip: str | Path | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> tuple[Path, dict]:
    """Score how a text-conditional model follows prompts. ``source`` is a run directory / checkpoint
    (``per_prompt`` samples are then drawn with ``sampling`` for each of ``sampling.prompts``, by default
    ``attribute_prompts`` of the data's classes, into RUN/text-eval-N/), a pipeline folder (the same,
    through the whole pipeline with ``sampling`` for its generator, into PIPELINE/text-eval-N/) or a
    folder of samples written by `ddpm sample` or `ddpm generate` from one. ``domain_clip``: the domain
    CLIP pair to score with (default: the run's own text encoder when it is one); ``clip``: a transformers
    CLIP model for the standard CLIP score. Writes the result as JSON (``out``, default text-eval.json
    beside the samples)."""
    import dataclasses

    from .evaluate import is_checkpoint
    from .sample import SampleOptions, sample_to_dir

    source = Path(source)
    if not source.exists():
        raise DataError(f"{source} does not exist; give a text-conditional run or its samples' folder")
    if per_prompt <= 0:
        raise DataError(f"per_prompt must be positive, got {per_prompt}", field="per_prompt")
    if clip is not None:
        clip = PretrainedClip(clip)  # a bad model fails before any sampling
    for name, folder in (("domain_clip", domain_clip), ("data_dir", data_dir)):
        if folder is not None and not Path(folder).is_dir():  # so does a missing folder
            raise DataError(f"{name} {folder} is not a folder", field=name)
    sampling = sampling or SampleOptions()
    if (source / "pipeline.json").is_file():
        source = _generate_through(source, per_prompt, sampling, progress)
    elif is_checkpoint(source):
        prompts = _prompts_to_score(Checkpoint(source).config, source, sampling)
        num = per_prompt * len(prompts)
        folder = (source if source.is_dir() else source.parent) / f"text-eval-{num}"
        sampling = dataclasses.replace(sampling, prompts=prompts, num=num, progress=progress)
        sample_to_dir(source, folder, sampling)
        source = folder
    folder = source if source.is_dir() else source.parent
    samples = load_samples(source)
    texts = sample_prompts(folder, len(samples))
    made = sample_record(folder)
    run_dir = Path(made["checkpoint"]).parent  # of a pipeline, its generator
    run_cfg = Checkpoint(made["checkpoint"]).config
    dataset = run_cfg["data"]["dataset"]
    class_names = run_cfg["data"].get("class_names") or ()
    real = _real_test_pairs(run_cfg, data_dir, len(samples), samples.shape[-1])

    result = {
        "metric": "text",
        "samples": str(folder),
        "num_samples": len(samples),
        "prompts": len(set(texts)),
    }
    result.update(_class_agreement(samples, texts, class_names, real, dataset, data_dir, cache_dir, progress))
    if class_names:
        result["attributes"] = attribute_shift(samples, texts, class_names)
        if real is not None:
            reference = attribute_shift(real[0], real[1], class_names)
            for key, summary in reference.items():
                result["attributes"][key]["real_test_images"] = {
                    k: summary[k] for k in ("mean_difference", "classes_in_direction", "classes")
                }
    pair = _domain_clip(domain_clip, run_dir)
    if pair is not None:
        model, path = pair
        result["domain_clip_score"] = {
            "model": path,
            "score": round(domain_clip_score(model, samples, texts), 4),
        }
        if real is not None:
            result["domain_clip_score"]["real_test_images"] = round(domain_clip_score(model, *real), 4)
    else:
        result["domain_clip_score"] = "needs a domain CLIP pair: give --domain-clip (ddpm train-text-encoder)"
    if clip is not None:
        result["clip_score"] = {"model": clip.name, "score": round(clip.score(samples, texts), 4)}
        if real is not None:
            result["clip_score"]["real_test_images"] = round(clip.score(*real), 4)
    result["sampling"] = made
    if (folder / "generate.json").is_file() and not (folder / "samples.json").is_file():
        result["pipeline"] = read_json(folder / "generate.json", expect=dict, strict=False)
    path = Path(out) if out else folder / "text-eval.json"
    write_json(path, result)
    return path, result


def _prompts_to_score(cfg: dict, source: Path, sampling) -> tuple[str, ...]:
    """The prompts to draw for a run's (or a pipeline generator's) ``cfg``: ``sampling.prompts``, by
    default ``attribute_prompts`` of its classes; one-line errors when it takes no text or has no classes."""
    if not cfg["model"].get("context_dim"):
        raise DataError(f"{source} is not text-conditional; `eval text` needs a run trained on captions")
    prompts = sampling.prompts or tuple(attribute_prompts(cfg["data"].get("class_names") or ()))
    if not prompts:
        raise DataError(
            f"{source}'s data has no class names: give prompts, the texts to score", field="prompts"
        )
    return prompts


def _generate_through(pipeline_dir: Path, per_prompt: int, sampling, progress: bool) -> Path:
    """Draw ``per_prompt`` images for each prompt through a pipeline (``sampling`` for its generator; its
    prompts, by default ``attribute_prompts`` of the generator's classes) into PIPELINE/text-eval-N/."""
    import dataclasses

    from .pipeline import Pipeline, generate_to_dir

    pipeline = Pipeline.load(pipeline_dir)
    prompts = _prompts_to_score(pipeline.generator.config, pipeline_dir, sampling)
    num = per_prompt * len(prompts)
    folder = pipeline_dir / f"text-eval-{num}"
    generate_to_dir(
        pipeline,
        folder,
        prompts=list(prompts),
        guidance=sampling.guidance_value,
        num=num,
        seed=sampling.seed,
        generator_options=dataclasses.replace(sampling, progress=progress),
    )
    return folder


def _real_test_pairs(run_cfg: dict, data_dir, num: int, size: int):
    """The first ``num`` test images of the run's data at ``size`` (the samples' size: a pipeline's
    generator makes smaller ones) with their made captions, or None where the data has no made captions
    (an image folder)."""
    from .data import load_dataset

    data = run_cfg["data"]
    if data["dataset"] not in ("fashion-mnist", "mnist", "cifar10"):
        return None
    cfg = DataConfig(
        dataset=data["dataset"],
        root=data_dir or data.get("root"),
        image_size=size,
        channels=data.get("channels"),
        split="test",
        labels="captions",
    )
    test = load_dataset(cfg)
    return test.data[:num], test.captions[:num]


def _class_agreement(samples, texts, class_names, real, dataset, data_dir, cache_dir, progress) -> dict:
    """Class agreement over the samples whose prompt names one class (domain classifier datasets)."""
    from .metrics import CLASSIFIER_VERSION, DOMAIN_DATASETS, class_agreement, classify, domain_classifier

    classes = [prompt_class(t, class_names) for t in texts] if class_names else []
    named = [i for i, c in enumerate(classes) if c is not None]
    if dataset not in DOMAIN_DATASETS or not named:
        return {}
    model, info = domain_classifier(dataset, data_dir, samples.shape[-1], cache_dir, progress)
    _, probs = classify(model, samples[named])
    agreement = class_agreement(probs, torch.tensor([classes[i] for i in named]), list(class_names))
    return {
        "extractor": f"domain-{dataset}-cnn-v{CLASSIFIER_VERSION}",
        "extractor_test_accuracy": info["test_accuracy"],
        "class_agreement": {**agreement, "samples_naming_a_class": len(named)},
    }


def _domain_clip(folder, run_dir: Path):
    """(the domain CLIP pair, its path): ``folder``, else the run's own text encoder when it is one."""
    from .clip import info_file, load_clip
    from .encoders import RUN_COPY

    if folder is not None:
        return load_clip(folder)[0], str(folder)
    copy = run_dir / RUN_COPY
    if info_file(copy) is not None:
        return load_clip(copy)[0], str(copy)
    return None
