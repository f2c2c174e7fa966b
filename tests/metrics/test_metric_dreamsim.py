"""DreamSim: cache checks and the glue around the package (a stand-in ``dreamsim`` module: no network, no weights)."""

import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch
from torchvision import transforms

from dynadiff.metrics import MissingWeightsError, compute_metrics
from dynadiff.metrics.config import MetricsWeightsConfig
from dynadiff.metrics.weights import DREAMSIM_FILES, source_status


class _FakeModel(torch.nn.Module):
    def embed(self, x):  # (B, 3, 224, 224) -> (B, 12)
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def _fake_package(calls):
    def dreamsim(pretrained=True, device="cuda", cache_dir="./models", **kwargs):
        calls.append(dict(pretrained=pretrained, device=device, cache_dir=cache_dir))
        torch.hub.set_dir(cache_dir)  # as the real one does
        print(f"Using cached {cache_dir}")
        preprocess = transforms.Compose(
            [transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor()]
        )
        return _FakeModel(), lambda img: preprocess(img.convert("RGB")).unsqueeze(0)

    module = types.ModuleType("dreamsim")
    module.__spec__ = importlib.machinery.ModuleSpec("dreamsim", None)
    module.dreamsim = dreamsim
    return module


@pytest.fixture
def fake_dreamsim(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "dreamsim", _fake_package(calls))
    return calls


def _fill_cache(folder, files=DREAMSIM_FILES):
    for name in (f.split("|")[-1] for f in files):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")


def test_incomplete_cache_is_reported_and_never_loaded(tmp_path, fake_dreamsim, images_factory):
    _fill_cache(tmp_path, DREAMSIM_FILES[:-1])
    config = MetricsWeightsConfig(dreamsim_cache=tmp_path)
    status = source_status("dreamsim", config)
    assert not status.present and "lacks checkpoints/dino_vitbase16_pretrain.pth" in status.problem
    imgs = images_factory(2, 20, 20)
    with pytest.raises(MissingWeightsError, match="dreamsim: DreamSim cache .* lacks checkpoints/dino_vitbase16_pretrain.pth; to get it"):
        compute_metrics(imgs, imgs, metrics=["dreamsim"], weights=config)
    assert fake_dreamsim == []  # dreamsim() would have downloaded: it was never called


def test_package_absent(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dreamsim", None)
    _fill_cache(tmp_path)
    status = source_status("dreamsim", MetricsWeightsConfig(dreamsim_cache=tmp_path))
    assert not status.present and status.problem == "the dreamsim package is not installed"
    assert "pip install dreamsim==" in status.how_to_get


def test_distance_is_one_minus_cosine_of_embeddings(tmp_path, fake_dreamsim, images_factory):
    _fill_cache(tmp_path)
    hub_dir = torch.hub.get_dir()
    recs, gts = images_factory(3, 30, 26, seed=1), images_factory(3, 30, 26, seed=2)
    result = compute_metrics(recs, gts, metrics=["dreamsim"], weights=MetricsWeightsConfig(dreamsim_cache=tmp_path), batch_size=2)
    assert fake_dreamsim == [dict(pretrained=True, device="cpu", cache_dir=str(tmp_path.absolute()))]
    assert torch.hub.get_dir() == hub_dir  # dreamsim's torch.hub.set_dir was undone
    from PIL import Image

    saved = torch.hub._hub_dir
    model, preprocess = sys.modules["dreamsim"].dreamsim(cache_dir=str(tmp_path))
    torch.hub._hub_dir = saved
    emb = lambda imgs: model.embed(torch.cat([preprocess(Image.fromarray(i)) for i in imgs])).double()
    want = 1 - torch.nn.functional.cosine_similarity(emb(recs), emb(gts)).numpy()
    np.testing.assert_allclose(result["per_image"]["dreamsim"], want, rtol=1e-5)
    assert result["higher_is_better"]["dreamsim"] is False
