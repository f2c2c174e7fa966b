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


def _resized_pixels(images) -> np.ndarray:
    """(N, 3, 224, 224) float32 in [0, 1]: PIL's bilinear resize (what torchvision's antialiased resize of a PIL
    image calls), written out here independently of feature_input."""
    x = np.stack([np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR)) for img in images])
    return x.transpose(0, 3, 1, 2).astype(np.float32) / 255


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_inception_avgpool_with_transform_input(weights_config, weight_files, images_factory):
    """Features equal an Inception-v3 forward written out here from the same weights file: ImageNet normalisation
    followed by ``transform_input`` (which undoes it channel by channel) feeds the network (p - 0.5) / 0.5 of the
    224x224 pixels p; then the stem, the Mixed blocks and the mean over the 5x5 map (avgpool, 2048)."""
    from torchvision import models

    net = load_network("inception", weights_config)
    assert net.module.transform_input is True
    _check_loaded(net.module, weight_files["inception"])
    images = images_factory(2, 30, 41)
    feats = extract_features(images, net)
    assert feats["inception"].shape == (2, 2048)

    ref = models.inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False)
    ref.load_state_dict(torch.load(weight_files["inception"], weights_only=True))
    ref.eval()
    x = torch.from_numpy((_resized_pixels(images) - 0.5) / 0.5)
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(ref, name)(x)
        assert x.shape == (2, 2048, 5, 5)  # 224 px input (299 would give 8x8)
        want = x.mean(dim=(2, 3))
    # float32 rounding of the two input paths (normalise then undo, vs (p - 0.5) / 0.5: ~1e-7 each) gives
    # ~3e-7 relative after ~50 layers (measured); a wrong mean, std or size moves the features by > 1e-3
    assert _relative_error(feats["inception"], want) < 1e-4
    # the images' features differ (random stand-in weights shrink them to ~1e-8, hence relative errors)
    assert _relative_error(feats["inception"][0], feats["inception"][1]) > 0.1


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
    images = images_factory(2, 30, 41)
    feats = extract_features(images, net)
    assert feats["swav"].shape == (2, 2048)
    # a ResNet-50 forward written out here from the checkpoint's trunk: ImageNet normalisation of the 224x224
    # pixels, stem, the 4 stages, mean over the 7x7 map (avgpool)
    from torchvision import models

    ref = models.resnet50(weights=None)
    state = torch.load(weight_files["swav"], weights_only=True)
    trunk = {k[len("module."):]: v for k, v in state.items() if not k.startswith(("module.projection_head",
                                                                                  "module.prototypes"))}
    missing = ref.load_state_dict(trunk, strict=False).missing_keys
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    ref.eval()
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    x = torch.from_numpy((_resized_pixels(images) - mean) / std)
    with torch.no_grad():
        x = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        x = ref.layer4(ref.layer3(ref.layer2(ref.layer1(x))))
        assert x.shape == (2, 2048, 7, 7)
        want = x.mean(dim=(2, 3))
    # the same arithmetic as feature_input up to float32 rounding: ~3e-7 relative (measured)
    assert _relative_error(feats["swav"], want) < 1e-4
    assert _relative_error(feats["swav"][0], feats["swav"][1]) > 0.1


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
