"""Tests for dfkt.models: the classifier contract, architectures, generator and registry lookups."""

from __future__ import annotations

import pytest
import torch

from dfkt.errors import ConfigError, UnknownNameError
from dfkt.models import Classifier, build_generator, build_model
from dfkt.registry import GENERATORS, MODELS

# (in_channels, image_size) used for each classifier; small sizes keep the tests fast.
SHAPES = {
    "lenet5": (1, 32),
    "lenet5_half": (1, 32),
    "resnet18": (3, 8),
    "resnet34": (3, 8),
    "wrn16_1": (3, 8),
    "wrn16_2": (3, 8),
    "wrn40_2": (3, 8),
    "digits_cnn": (1, 8),
    "digits_cnn_half": (1, 8),
    "shot_lenet": (1, 28),
    "shot_dtn": (3, 32),
    "shot_resnet18": (3, 8),
    "shot_resnet34": (3, 8),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_is_covered():
    assert set(MODELS.names()) == set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_classifier_contract(name):
    torch.manual_seed(0)
    channels, size = SHAPES[name]
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    assert isinstance(model, Classifier)
    assert (model.num_classes, model.in_channels, model.image_size) == (7, channels, size)
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert logits.shape == (3, 7)
        assert features.shape == (3, model.feature_dim)
        torch.testing.assert_close(model.classify(features), logits)


@pytest.mark.parametrize("name", ["resnet18", "wrn16_1", "digits_cnn"])
def test_size_independent_models_accept_32(name):
    model = build_model(name, 10, 3, 32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lenet5_parameter_count():
    # conv1 1*6*25+6 = 156; conv2 6*16*25+16 = 2,416; conv3 16*120*25+120 = 48,120;
    # fc 120*84+84 = 10,164; fc 84*10+10 = 850; total 61,706.
    assert n_params(build_model("lenet5", 10, 1, 32)) == 61_706
    # conv 1*3*25+3 = 78; 3*8*25+8 = 608; 8*60*25+60 = 12,060; fc 60*42+42 = 2,562; 42*10+10 = 430.
    assert n_params(build_model("lenet5_half", 10, 1, 32)) == 15_738


def test_resnet_and_wrn_parameter_counts():
    # Reference counts of the standard CIFAR-10 versions of these networks.
    assert n_params(build_model("resnet18", 10, 3, 32)) == 11_173_962
    assert n_params(build_model("resnet34", 10, 3, 32)) == 21_282_122
    assert n_params(build_model("wrn16_1", 10, 3, 32)) == 175_066
    assert n_params(build_model("wrn16_2", 10, 3, 32)) == 691_674
    assert n_params(build_model("wrn40_2", 10, 3, 32)) == 2_243_546


def test_half_variants_are_smaller():
    assert n_params(build_model("lenet5_half", 10, 1, 32)) < n_params(build_model("lenet5", 10, 1, 32))
    assert n_params(build_model("digits_cnn_half", 10, 1, 8)) < n_params(build_model("digits_cnn", 10, 1, 8))


def test_digits_cnn_has_batchnorm():
    model = build_model("digits_cnn", 10, 1, 8)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        build_model("lenet6", 10, 1, 32)
    assert "lenet5" in str(info.value) and "resnet18" in str(info.value)
    with pytest.raises(UnknownNameError, match="dafl"):
        build_generator("dcgan", 100, 1, 32)


def test_lenet5_rejects_28():
    with pytest.raises(ConfigError, match="pad"):
        build_model("lenet5", 10, 1, 28)


def test_too_small_image_raises():
    with pytest.raises(ConfigError, match="resnet18 needs image_size >= 8, got 4"):
        build_model("resnet18", 10, 3, 4)


@pytest.mark.parametrize("size", [8, 32])
def test_generator_output(size):
    torch.manual_seed(0)
    gen = build_generator("dafl", nz=16, out_channels=3, image_size=size).train()
    assert gen.nz == 16 and "dafl" in GENERATORS
    images = gen(torch.randn(8, 16))
    assert images.shape == (8, 3, size, size)
    # The last layer is an affine-free BatchNorm, so each channel has batch mean 0.
    channel_means = images.mean(dim=(0, 2, 3))
    torch.testing.assert_close(channel_means, torch.zeros(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size, init, stages", [(224, 7, 5), (32, 8, 2), (64, 8, 3)])
def test_deep_generator_reaches_imagenet_size_from_a_small_map(size, init, stages):
    torch.manual_seed(0)
    gen = build_generator("deep", nz=32, out_channels=3, image_size=size).train()
    assert gen.init_size == init and sum(isinstance(m, torch.nn.Upsample) for m in gen.modules()) == stages
    images = gen(torch.randn(4, 32))
    assert images.shape == (4, 3, size, size)
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_imagenet_presets_use_the_deep_generator_and_dafl_refuses_a_huge_first_layer():
    from dfkt.registry import METHODS

    for method in ("rdskd", "dafl"):
        assert METHODS.get(method).presets["paper-imagenet"]["generator"] == "deep"
    with pytest.raises(ConfigError, match="params.generator=deep"):
        build_generator("dafl", 1000, 3, 224)
    with pytest.raises(ConfigError, match="up to 8 times a power of two"):
        build_generator("deep", 100, 3, 100)


def test_generator_rejects_size_not_divisible_by_4():
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_generator("dafl", 100, 1, 30)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_shot_models_have_bottleneck_features_and_a_weight_normalised_head(tmp_path):
    from dfkt.models.files import ModelInfo, load_model, save_model

    # SHOT's digit LeNet at 28 px: conv 1*20*25+20 = 520; 20*50*25+50 = 25,050; bottleneck 800*256+256 = 205,056;
    # BatchNorm1d 2*256 = 512; head v 256*10 + g 10 + bias 10 = 2,580; total 233,718.
    model = build_model("shot_lenet", 10, 1, 28).eval()
    assert n_params(model) == 233_718
    x = torch.randn(3, 1, 28, 28)
    assert model.forward_features(x).shape == (3, 256) and model.feature_dim == 256
    assert hasattr(model.head, "parametrizations")  # weight-normalised
    path = save_model(model, ModelInfo("shot_lenet", 10, 1, 28, (0.3,), (0.4,), "mnist"), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.allclose(load_model(path)[0].eval()(x), model(x))
    assert build_model("shot_dtn", 10, 3, 32).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
