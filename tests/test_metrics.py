import json

import numpy as np
import pytest
import torch

from ddpm.errors import DataError
from ddpm.metrics import (
    classifier_score,
    domain_classifier,
    evaluate_domain,
    feature_statistics,
    fid_uncertainty,
    frechet_distance,
    frechet_distance_to_features,
    kernel_inception_distance,
    psd_sqrt,
    real_floor,
)


def test_frechet_distance_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))  # a shared rotation: the covariances commute
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    got = frechet_distance(m1, q @ np.diag(s1) @ q.T, m2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_covariances_match_matrix_square_root():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    # Tr((S1 S2)^1/2) from the eigenvalues of S1 S2 directly (they are real and positive)
    trace_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    assert frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(
        np.trace(s1) + np.trace(s2) - 2 * trace_sqrt, rel=1e-8
    )


def test_fid_of_samples_from_two_gaussians_and_of_a_set_with_itself():
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(20_000, 3))
    y = rng.normal(0.5, 2.0, size=(20_000, 3))
    assert frechet_distance(*feature_statistics(x), *feature_statistics(x)) == pytest.approx(0, abs=1e-9)
    closed_form = 3 * 0.5**2 + 3 * (1.0 - 2.0) ** 2
    assert frechet_distance(*feature_statistics(x), *feature_statistics(y)) == pytest.approx(
        closed_form, rel=0.03
    )


def test_the_fids_bootstrap_standard_error_matches_its_spread_over_fresh_samples():
    """Drawing the samples again moves the FID by its standard deviation over draws; the bootstrap over
    one draw's samples estimates that spread (within 25% on average here, 200 fresh draws against 10
    bootstraps of 50 resamples), and its 95% interval is the estimate +- 1.96 se."""
    rng = np.random.default_rng(0)
    dim, n = 16, 500
    mu, sigma = feature_statistics(rng.normal(size=(20_000, dim)))

    def draw(seed):
        return np.random.default_rng(seed).normal(size=(n, dim)) * 1.1 + 0.1

    fids = [frechet_distance(*feature_statistics(draw(100 + i)), mu, sigma) for i in range(200)]
    spread = np.std(fids, ddof=1)
    errors = []
    for seed in range(10):
        features = draw(1000 + seed)
        fid = frechet_distance(*feature_statistics(features), mu, sigma)
        result = fid_uncertainty(features, mu, sigma, fid, resamples=50, seed=seed)
        lo, hi = result["fid_interval"]
        assert lo == pytest.approx(max(fid - 1.959964 * result["fid_se"], 0), abs=2e-4)
        assert hi == pytest.approx(fid + 1.959964 * result["fid_se"], abs=2e-4)
        errors.append(result["fid_se"])
    assert 0.75 < np.mean(errors) / spread < 1.25
    with pytest.raises(DataError, match="resamples must be at least 2"):
        fid_uncertainty(features, mu, sigma, fid, resamples=1)


@pytest.mark.parametrize("n", [3, 40, 200])  # fewer samples than dimensions (the N x N route), more
def test_the_distance_to_features_is_the_frechet_distance_of_their_statistics(n):
    """The bootstrap's distance from the features themselves equals ``frechet_distance`` of their mean and
    covariance, whichever of the N x N and D x D matrices it decomposes."""
    rng = np.random.default_rng(n)
    mu, sigma = feature_statistics(rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)))
    features = rng.normal(size=(n, 64)) * 2 + 0.5
    expected = frechet_distance(*feature_statistics(features), mu, sigma)
    got = frechet_distance_to_features(features, mu, sigma, psd_sqrt(sigma))
    assert got == pytest.approx(expected, rel=1e-7)  # the D x D route adds roots of rounding errors
    with pytest.raises(DataError, match="need at least 2 feature vectors"):
        frechet_distance_to_features(features[:1], mu, sigma, psd_sqrt(sigma))


def test_the_real_data_floor_is_the_fid_of_real_images_at_the_same_count():
    """Real images from the same distribution as the reference score the floor: a small FID that shrinks
    as the count grows (FID is biased upward at small n), from a seeded pick of the images."""
    rng = np.random.default_rng(3)
    real = torch.as_tensor(rng.integers(0, 256, size=(4000, 1, 2, 2)), dtype=torch.uint8)
    reference = torch.as_tensor(rng.integers(0, 256, size=(20_000, 4)), dtype=torch.float64).numpy()
    stats = feature_statistics(reference)

    def features(images):
        return images.reshape(len(images), -1).double().numpy()

    small, large = (real_floor(features, real, n, stats) for n in (200, 4000))
    assert small["num_images"] == 200 and large["num_images"] == 4000
    assert 0 < large["fid"] < small["fid"]
    assert real_floor(features, real, 200, stats) == small  # seeded
    assert real_floor(features, real, 10_000, stats)["num_images"] == 4000  # all there is


def test_kid_and_classifier_score():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    same, _ = kernel_inception_distance(x, y, subsets=5, subset_size=200)
    different, _ = kernel_inception_distance(x, y + 1.0, subsets=5, subset_size=200)
    assert abs(same) < 0.05 < different
    confident = np.eye(10)[np.arange(1000) % 10]  # sure of each class, all classes equally often
    assert classifier_score(confident)[0] == pytest.approx(10, rel=1e-6)
    assert classifier_score(np.eye(10)[np.zeros(1000, int)])[0] == pytest.approx(1, rel=1e-6)


def test_domain_fid_end_to_end(idx_dir, tmp_path):
    from ddpm.data import load_idx_dataset

    cache = tmp_path / "cache"
    test_images = load_idx_dataset("fashion-mnist", str(idx_dir), "test")
    same = evaluate_domain(test_images, "fashion-mnist", "test", str(idx_dir), cache, progress=False)
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert same["real_floor"]["split"] == "train" and same["real_floor"]["num_images"] == len(test_images)
    assert same["fid_se"] > 0 and same["fid_interval"][0] <= same["fid"] < same["fid_interval"][1]
    assert same["extractor"].startswith("domain-fashion-mnist") and same["reference"]["split"] == "test"
    assert list(cache.glob("*.safetensors"))  # trained once, cached
    noise = torch.randint(0, 256, test_images.shape, generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )
    far = evaluate_domain(noise, "fashion-mnist", "test", str(idx_dir), cache, progress=False)
    assert far["fid"] > 1e-3
    with pytest.raises(DataError, match="uint8"):
        evaluate_domain(noise.float(), "fashion-mnist", "test", str(idx_dir), cache, progress=False)
    with pytest.raises(DataError, match="domain classifier"):
        domain_classifier("cifar10", None, 32, cache, progress=False)


def test_rgb_samples_are_refused_before_a_classifier_is_trained(tmp_path, monkeypatch):
    from ddpm import metrics

    monkeypatch.setattr(metrics, "domain_classifier", lambda *a, **k: pytest.fail("trained a classifier"))
    rgb = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(DataError, match="samples have 3 channels; fashion-mnist is grayscale"):
        evaluate_domain(rgb, "fashion-mnist", cache_dir=tmp_path)


def test_class_agreement_counts_top_class_hits_per_class():
    from ddpm.metrics import class_agreement

    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    result = class_agreement(probs, torch.tensor([0, 1, 1, 2]), ["a", "b", "c"])
    assert result == {
        "overall": 0.75,
        "per_class": {
            "a": {"agreement": 1.0, "samples": 1},
            "b": {"agreement": 0.5, "samples": 2},
            "c": {"agreement": 1.0, "samples": 1},
        },
    }
    with pytest.raises(DataError, match="3 labels for 4 samples"):
        class_agreement(probs, torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match="class ids in 0..2"):
        class_agreement(probs, torch.tensor([0, 1, 2, 3]))


def test_real_images_with_their_labels_agree_as_often_as_the_classifier_is_accurate(idx_dir, tmp_path):
    from ddpm.data import load_idx_dataset

    images = load_idx_dataset("fashion-mnist", str(idx_dir), "test")
    labels = load_idx_dataset("fashion-mnist", str(idx_dir), "test", kind="labels")
    args = ("fashion-mnist", "test", str(idx_dir), tmp_path, False)
    result = evaluate_domain(images, *args, labels=labels)
    # the test accuracy is measured on these very images: the two numbers must be the same
    assert result["class_agreement"]["overall"] == result["extractor_test_accuracy"]
    shuffled = evaluate_domain(images, *args, labels=(labels + 1) % 10)
    assert shuffled["class_agreement"]["overall"] != result["class_agreement"]["overall"]
    counts = {k: v["samples"] for k, v in result["class_agreement"]["per_class"].items()}
    assert sum(counts.values()) == len(images)


def test_the_comparison_script_puts_two_results_side_by_side_with_the_differences_interval(tmp_path, capsys):
    """bench/compare_fid.py: the difference's standard error is the two errors' root sum of squares, and a
    difference whose interval holds 0 is none."""
    import runpy
    from pathlib import Path

    compare = runpy.run_path(str(Path(__file__).parent.parent / "bench" / "compare_fid.py"))
    reference = {"dataset": "fashion-mnist", "split": "test", "num_images": 10_000}

    def result(fid, se, n=5000, **more):
        interval = [fid - 1.959964 * se, fid + 1.959964 * se]
        return {
            "fid": fid,
            "fid_se": se,
            "fid_interval": interval,
            "num_samples": n,
            "reference": reference,
            "extractor": "domain-fashion-mnist-cnn-v1",
            "real_floor": {"fid": 1.5},
            **more,
        }

    lines = compare["compare"](
        {"base": result(40.0, 3.0), "new": result(20.0, 4.0), "same": result(38.0, 4.0)}
    )
    assert "-20.00 [-29.80, -10.20] better" in lines[2]  # se 5 = hypot(3, 4)
    assert "-2.00 [-11.80, +7.80] no difference" in lines[3] and "1.50" in lines[1]
    small = compare["compare"](
        {"base": result(40.0, 3.0), "small": result(60.0, 1.0, n=1000, screening=True)}
    )
    assert "worse (screening)" in small[2] and "sample counts differ" in small[-1]
    other = result(5.0, 1.0, extractor="inception-v3-compat")
    with pytest.raises(SystemExit, match="different extractors or references"):
        compare["compare"]({"base": result(40.0, 3.0), "other": other})
    for name, value in (("a", result(40.0, 3.0)), ("b", result(30.0, 3.0))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "fid.json").write_text(json.dumps(value))
    assert compare["main"]([str(tmp_path / "a" / "fid.json"), str(tmp_path / "b" / "fid.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].startswith("b ") and out.splitlines()[2].endswith("better")  # -10 +- 8.3


def test_the_quality_curves_script_plots_finished_points_with_their_intervals(tmp_path, capsys):
    """bench/quality_curves.py: evaluations per sample, settings and recipes parsed strictly, finished
    points reused (no command runs here), curve.json and curve.png written."""
    import runpy
    from pathlib import Path

    curves = runpy.run_path(str(Path(__file__).parent.parent / "bench" / "quality_curves.py"))
    assert curves["evaluations"]("edm", 10) == 19 and curves["evaluations"]("sde-dpm++3m", 20) == 20
    assert curves["parse_setting"]("sde-dpm++3m:20:3") == ("sde-dpm++3m", 20, 3.0)
    assert curves["parse_setting"]("edm:10") == ("edm", 10, None)
    for bad in ("edm", "edm:0", "edm:x:1", "a:1:2:3"):
        with pytest.raises(SystemExit, match="a setting is SAMPLER:STEPS"):
            curves["parse_setting"](bad)
    assert curves["parse_recipe"]("new=--preset fashion-mnist --set a=b") == (
        "new",
        ["--preset", "fashion-mnist", "--set", "a=b"],
    )
    with pytest.raises(SystemExit, match="a recipe is NAME=ARGS"):
        curves["parse_recipe"]("--preset fashion-mnist")

    def result(fid, n=5000):
        return {"fid": fid, "fid_interval": [fid - 3, fid + 4], "num_samples": n, "real_floor": {"fid": 1.0}}

    out = tmp_path / "nfe"
    out.mkdir()
    for name, fid in (("edm-10", 50.0), ("sde-dpm++3m-20-eta3", 40.0)):
        (out / f"{name}.fid.json").write_text(json.dumps(result(fid)))
    argv = ["nfe", str(out), "run", "--setting", "edm:10", "--setting", "sde-dpm++3m:20:3"]
    assert curves["main"](argv) == 0
    points = json.loads((out / "curve.json").read_text())
    assert [(p["recipe"], p["nfe"], p["fid"], p["fid_interval"]) for p in points] == [
        ("edm", 19, 50.0, [47.0, 54.0]),
        ("sde-dpm++3m eta 3", 20, 40.0, [37.0, 44.0]),
    ]
    assert (out / "curve.png").stat().st_size > 1000
    assert "FID   40.00 [37.00, 44.00]" in capsys.readouterr().out
    out = tmp_path / "minutes"
    for minutes, fid in ((3, 60.0), (6, 45.0)):
        run = out / f"demo-{minutes}min"
        run.mkdir(parents=True)
        (run / "checkpoint.safetensors").write_bytes(b"")  # (a finished run: not trained again)
        (run / "train.json").write_text(json.dumps({"step": 100 * minutes, "train_seconds": 60.0 * minutes}))
        (out / f"demo-{minutes}min.fid.json").write_text(json.dumps(result(fid)))
    assert curves["main"](["minutes", str(out), "--recipe", "demo=--preset x", "--minutes", "3", "6"]) == 0
    points = json.loads((out / "curve.json").read_text())
    assert [(p["minutes"], p["steps"], p["fid"]) for p in points] == [(3.0, 300, 60.0), (6.0, 600, 45.0)]
    given = ["points", str(out), "--point", f"old:6.6:{out / 'demo-3min.fid.json'}"]
    assert curves["main"](given + ["--point", f"new:25:{out / 'demo-6min.fid.json'}"]) == 0
    points = json.loads((out / "curve.json").read_text())
    expected = [("old", 6.6, 60.0), ("new", 25.0, 45.0)]
    assert [(p["recipe"], p["minutes"], p["fid"]) for p in points] == expected
    for bad in ("old:6.6", "old:x:a.json", ":1:a.json"):
        with pytest.raises(SystemExit, match="a point is RECIPE:MINUTES:RESULT.json"):
            curves["main"](["points", str(out), "--point", bad])
    with pytest.raises(SystemExit, match="no eval result at"):
        curves["main"](["points", str(out), "--point", f"old:1:{out / 'missing.json'}"])
