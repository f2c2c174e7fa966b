"""compute_metrics: skipping and errors for missing weights, consistency with the per-metric functions."""

import inspect
import json
import logging

import numpy as np
import pydantic
import pytest

from dynadiff.metrics import CHANCE_LEVELS, METRIC_NAMES, MetricsConfig, MetricsWeightsConfig, MissingWeightsError, compute_metrics
from dynadiff.metrics.distances import correlation_distance
from dynadiff.metrics.features import extract_features
from dynadiff.metrics.identification import two_way_identification
from dynadiff.metrics.pixel import pixcorr, ssim
from dynadiff.metrics.suite import resolve_metrics


def test_missing_weights_are_skipped_with_a_one_line_reason(images_factory, empty_weights, caplog):
    imgs = images_factory(2, 20, 24)
    with caplog.at_level(logging.WARNING, logger="dynadiff.metrics"):
        result = compute_metrics(imgs, imgs[::-1], weights=empty_weights)
    assert result["metrics"] == ["pixcorr", "ssim"]
    assert set(result["skipped"]) == set(METRIC_NAMES) - {"pixcorr", "ssim"}
    for reason in result["skipped"].values():
        assert "\n" not in reason and "to get it:" in reason
    assert "alexnet-owt-7be5be79.pth" in result["skipped"]["alexnet2"]
    assert "swav_800ep_pretrain.pth.tar" in result["skipped"]["swav"]
    assert any("skipping clip: no CLIP ViT-L/14 config at" in r.getMessage() for r in caplog.records)


def test_requested_metric_without_weights_is_an_error(images_factory, empty_weights):
    imgs = images_factory(2, 20, 24)
    with pytest.raises(MissingWeightsError, match=r"(?s)clip: no CLIP.*swav: no file .*swav_800ep_pretrain.pth.tar; to get it"):
        compute_metrics(imgs, imgs, metrics=["pixcorr", "clip", "swav"], weights=empty_weights)


def test_full_suite_matches_the_per_metric_functions(images_factory, weights_config, monkeypatch):
    from dynadiff.metrics import suite

    seen = []  # the features the suite computed, to recompute its metrics from them independently
    monkeypatch.setattr(suite, "extract_features", lambda *a, **k: seen.append(extract_features(*a, **k)) or seen[-1])
    recs = images_factory(2, 40, 48, seed=1)
    gts = images_factory(2, 44, 36, seed=2)
    result = compute_metrics(recs, gts, weights=weights_config, batch_size=1, identification="per_reconstruction")
    json.dumps(result)  # serialisable as is
    assert result["metrics"] == [m for m in METRIC_NAMES if m != "dreamsim"]
    assert "the dreamsim package is not installed" in result["skipped"]["dreamsim"] or "lacks" in result["skipped"]["dreamsim"]
    assert result["n_images"] == 2 and result["identification"] == "per_reconstruction"
    for m in result["metrics"]:
        assert len(result["per_image"][m]) == 2
        assert result["means"][m] == pytest.approx(np.mean(result["per_image"][m]))
        assert m in result["shuffled"]
        assert result["chance"][m] == CHANCE_LEVELS[m]
    assert result["chance"]["alexnet2"] == 0.5 and result["higher_is_better"]["effnet"] is False
    np.testing.assert_allclose(result["per_image"]["pixcorr"], pixcorr(recs, gts))
    np.testing.assert_allclose(result["per_image"]["ssim"], ssim(recs, gts))
    # one network each, reconstructions then ground truths, in the canonical order
    assert [sorted(f) for f in seen] == [["alexnet2", "alexnet5"]] * 2 + [["inception"]] * 2 + [["clip"]] * 2 + [["effnet"]] * 2 + [["swav"]] * 2
    feats = {m: (rec[m], gt[m]) for rec, gt in zip(seen[::2], seen[1::2]) for m in rec}
    for m in ("alexnet2", "alexnet5", "inception", "clip"):
        rec, gt = feats[m]
        assert rec.shape[0] == gt.shape[0] == 2
        np.testing.assert_array_equal(result["per_image"][m], two_way_identification(rec, gt, "per_reconstruction"))
        assert result["shuffled"][m] == pytest.approx(two_way_identification(rec, gt[[1, 0]], "per_reconstruction").mean())
    for m in ("effnet", "swav"):
        rec, gt = feats[m]
        np.testing.assert_allclose(result["per_image"][m], correlation_distance(rec, gt), rtol=1e-12)
        assert result["shuffled"][m] == pytest.approx(correlation_distance(rec, gt[[1, 0]]).mean())


def test_identical_images_identify_perfectly_at_zero_distance(images_factory, weights_config):
    imgs = images_factory(2, 32, 32, seed=3)
    result = compute_metrics(imgs, imgs, metrics=["pixcorr", "ssim", "alexnet2", "alexnet5", "clip", "swav"], weights=weights_config)
    for m in ("pixcorr", "ssim", "alexnet2", "alexnet5", "clip"):
        assert result["means"][m] == pytest.approx(1.0), m
    assert result["means"]["swav"] == pytest.approx(0.0, abs=1e-6)


def test_shuffled_baseline_is_the_metric_on_mismatched_pairs():
    rng = np.random.default_rng(4)
    gts = [rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8) for _ in range(8)]
    recs = [np.clip(g + rng.normal(0, 30, g.shape), 0, 255).astype(np.uint8) for g in gts]
    result = compute_metrics(recs, gts, metrics="pixcorr,ssim")
    for m, func in (("pixcorr", pixcorr), ("ssim", ssim)):
        assert result["shuffled"][m] == pytest.approx(func(recs, gts[1:] + gts[:1]).mean())
    assert result["means"]["pixcorr"] > 0.5
    assert abs(result["shuffled"]["pixcorr"]) < 0.05  # independent noise images: chance is 0


def test_metric_names_and_defaults():
    assert resolve_metrics(None) == list(METRIC_NAMES)
    assert resolve_metrics(["ssim", "PixCorr"]) == ["pixcorr", "ssim"]
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['lpips'\]"):
        resolve_metrics(["lpips"])
    assert inspect.signature(compute_metrics).parameters["identification"].default == "per_ground_truth"
    assert MetricsConfig().identification == "per_ground_truth"


def test_config_is_strict_and_computes(images_factory, empty_weights):
    with pytest.raises(pydantic.ValidationError, match="extra"):
        MetricsConfig(metric=["ssim"])
    with pytest.raises(pydantic.ValidationError):
        MetricsConfig(identification="mindeye")
    with pytest.raises(pydantic.ValidationError):
        MetricsConfig(batch_size=0)
    imgs = images_factory(2, 20, 20)
    result = MetricsConfig(metrics=["pixcorr"], weights=empty_weights, progress=False).compute(imgs, imgs)
    assert result["means"] == {"pixcorr": pytest.approx(1.0)}


def test_pairs_must_match(images_factory):
    imgs = images_factory(3, 20, 20)
    with pytest.raises(ValueError, match="3 reconstructions but 2 ground truths"):
        compute_metrics(imgs, imgs[:2], metrics=["pixcorr"])
    with pytest.raises(ValueError, match="at least 1 image pair"):
        compute_metrics([], [], metrics=["pixcorr"])


def test_a_single_pair(images_factory, weights_config, tmp_path):
    img = images_factory(1, 20, 20)
    result = compute_metrics(img, img, weights=weights_config, metrics=["pixcorr"])
    assert result["means"]["pixcorr"] == pytest.approx(1.0) and result["shuffled"] == {}
    with pytest.raises(ValueError, match=r"two-way identification \(alexnet2\) needs at least 2 image pairs, got 1"):
        compute_metrics(img, img, weights=weights_config, metrics=["pixcorr", "alexnet2"])
    only_clip = MetricsWeightsConfig(clip_path=weights_config.clip_path, torch_home=tmp_path, weights_dir=tmp_path)
    result = compute_metrics(img, img, weights=only_clip)
    assert result["metrics"] == ["pixcorr", "ssim"]
    assert result["skipped"]["clip"] == "two-way identification needs at least 2 image pairs"


def test_bad_files_and_images_fail_before_any_work(images_factory, weight_files, monkeypatch):
    from dynadiff.metrics import InvalidWeightsError, suite

    monkeypatch.setattr(suite, "_pixel_metrics", lambda *a, **k: pytest.fail("work started"))
    imgs = images_factory(2, 20, 20)
    published = MetricsWeightsConfig(torch_home=weight_files["torch_home"], verify=True)  # random files: hashes differ
    with pytest.raises(InvalidWeightsError, match="alexnet-owt-7be5be79.pth is not torchvision's published file"):
        compute_metrics(imgs, imgs, metrics=["pixcorr", "alexnet2", "effnet"], weights=published)
    with pytest.raises(TypeError, match=r"ground_truths\[1\] must be a PIL image"):
        compute_metrics(imgs, [imgs[0], None], metrics=["pixcorr"])
