"""Feature networks through the real loading path, with random-weight files under the official names."""

import numpy as np
import pytest
import torch
from PIL import Image

from dynadiff.metrics import weights as W
from dynadiff.metrics.config import MetricsWeightsConfig
from dynadiff.metrics.features import (
    CLIP_MEAN,
    CLIP_STD,
    CLIP_VIT_L14,
    IMAGENET_MEAN,
    IMAGENET_STD,
    extract_features,
    feature_input,
    load_network,
)


def test_torchvision_file_names_are_torchvision_s():
    from torchvision.models import get_weight

    for source, name in W.TORCHVISION_FILES.items():
        weights = get_weight(W.TORCHVISION_WEIGHTS_ENUM[source])
        assert weights.url == W.TORCHVISION_URL + name
    assert W.TORCHVISION_WEIGHTS_ENUM["effnet"].endswith("IMAGENET1K_V1")


@pytest.mark.parametrize("mean,std", [(IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD)])
def test_feature_input_is_bilinear_224_to_tensor_normalised(images_factory, mean, std):
    img = images_factory(1, 61, 47)[0]
    got = feature_input(img, mean, std)
    resized = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    want = (resized - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def _batch(images, net):
    return torch.stack([feature_input(img, net.mean, net.std) for img in images])


def _check_loaded(module, path, prefix=""):
    saved = torch.load(path, weights_only=True)
    for key, value in module.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), saved[prefix + key].numpy(), err_msg=key)


def test_alexnet_layers(weights_config, weight_files, images_factory):
    net = load_network("alexnet", weights_config)
    _check_loaded(net.module, weight_files["alexnet"])
    images = images_factory(2, 40, 50)
    feats = extract_features(images, net, batch_size=1)
    assert set(feats) == {"alexnet2", "alexnet5"}
    assert feats["alexnet2"].shape == (2, 192 * 27 * 27)
    assert feats["alexnet5"].shape == (2, 256 * 13 * 13)
    with torch.no_grad():
        x = _batch(images, net)
        layer4 = net.module.features[:5](x)
        layer11 = net.module.features[:12](x)
    assert layer4.shape == (2, 192, 27, 27) and layer11.shape == (2, 256, 13, 13)
    torch.testing.assert_close(feats["alexnet2"], layer4.flatten(1))
    torch.testing.assert_close(feats["alexnet5"], layer11.flatten(1))


def test_inception_avgpool_with_transform_input(weights_config, weight_files, images_factory):
    net = load_network("inception", weights_config)
    assert net.module.transform_input is True
    _check_loaded(net.module, weight_files["inception"])
    feats = extract_features(images_factory(2, 30, 30), net)
    assert feats["inception"].shape == (2, 2048)


def test_effnet_avgpool(weights_config, weight_files, images_factory):
    net = load_network("effnet", weights_config)
    _check_loaded(net.module, weight_files["effnet"])
    images = images_factory(1, 30, 30)  # EfficientNet is slow on CPU
    feats = extract_features(images, net)
    assert feats["effnet"].shape == (1, 1280)
    with torch.no_grad():
        want = net.module.avgpool(net.module.features(_batch(images, net))).flatten(1)
    torch.testing.assert_close(feats["effnet"], want)


def test_swav_from_hub_checkpoint_layout(weights_config, weight_files, images_factory):
    net = load_network("swav", weights_config)
    _check_loaded(net.module, weight_files["swav"], prefix="module.")
    assert isinstance(net.module.fc, torch.nn.Identity)
    feats = extract_features(images_factory(2, 30, 30), net)
    assert feats["swav"].shape == (2, 2048)


def test_swav_with_a_missing_key_is_an_error(weight_files, tmp_path):
    state = torch.load(weight_files["swav"], weights_only=True)
    del state["module.layer4.2.bn3.weight"]
    path = tmp_path / "swav.pth"
    torch.save(state, path)
    with pytest.raises(W.InvalidWeightsError, match=r"missing keys \['layer4.2.bn3.weight'\]"):
        load_network("swav", MetricsWeightsConfig(swav_path=path))


def test_clip_image_embedding(weights_config, weight_files, images_factory):
    from transformers import CLIPModel

    net = load_network("clip", weights_config)
    assert (net.mean, net.std) == (CLIP_MEAN, CLIP_STD)
    images = images_factory(2, 30, 30)
    feats = extract_features(images, net)
    assert feats["clip"].shape == (2, 24)  # the tiny model's projection_dim
    full = CLIPModel.from_pretrained(weight_files["clip"], local_files_only=True).eval()
    with torch.no_grad():
        want = full.visual_projection(full.vision_model(pixel_values=_batch(images, net)).pooler_output)
    torch.testing.assert_close(feats["clip"], want)


def test_clip_vit_l14_config_gives_768():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):  # shapes only, no memory, no time
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14))
        out = model(pixel_values=torch.empty(2, 3, 224, 224)).image_embeds
    assert out.shape == (2, 768)


def test_verify_rejects_stand_in_weights(weight_files, tmp_path):
    with pytest.raises(W.InvalidWeightsError, match="not CLIP ViT-L/14"):
        load_network("clip", MetricsWeightsConfig(clip_path=weight_files["clip"], verify=True))
    # a random file under the official name fails torchvision's hash check
    with pytest.raises(W.InvalidWeightsError, match=r"SHA-256 starts with .* the name says bac287d4"):
        load_network("effnet", MetricsWeightsConfig(torch_home=weight_files["torch_home"], verify=True))


def test_unreadable_file_is_an_error(tmp_path):
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / W.TORCHVISION_FILES["alexnet"]).write_bytes(b"<html>not found</html>")
    with pytest.raises(W.InvalidWeightsError, match="cannot read .*alexnet-owt-7be5be79.pth"):
        load_network("alexnet", MetricsWeightsConfig(torch_home=tmp_path, verify=False))


def test_missing_file_names_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(W.MissingWeightsError, match=r"no file .*hub/checkpoints/inception_v3_google-0cc3c7bd.pth; to get it: .*download"):
        load_network("inception", MetricsWeightsConfig(torch_home=tmp_path))
    with pytest.raises(W.MissingWeightsError, match=r"clip: no CLIP ViT-L/14 config at .*config.json; to get it: `hf download openai/clip-vit-large-patch14"):
        load_network("clip", MetricsWeightsConfig(weights_dir=tmp_path))
