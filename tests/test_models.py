"""Model registry: the scratch CNN's options, and InceptionV3 weights loading, aux loss and freezing."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import inception_v3 as tv_inception_v3

from train.config import MODEL_NAMES, ConfigError, ModelConfig
from train.loop.epoch import classification_loss
from train.models.registry import MODELS, build_model


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_scratch_cnn_shapes_and_options(norm):
    cfg = ModelConfig(width=8, depth=3, convs_per_block=2, dropout=0.5, norm=norm)
    model = build_model(cfg, num_classes=3)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and convs[-1].out_channels == 8 * 2**2
    assert model.dropout.p == 0.5
    has = {type(m).__name__ for m in model.modules()}
    assert ("BatchNorm2d" in has) == (norm == "batch") and ("GroupNorm" in has) == (norm == "group")


@pytest.mark.parametrize("convs", [1, 2])
def test_pool_before_norm_is_the_same_function_in_eval(convs):
    """conv-pool-norm-ReLU == conv-norm-ReLU-pool when each norm's scale is positive (both monotone per channel, so
    max-pool commutes): same parameters, same eval outputs; only training's batch statistics see other values."""
    torch.manual_seed(0)
    kw = dict(width=8, depth=3, convs_per_block=convs, image_size=32)
    plain = build_model(ModelConfig(**kw), 2).eval()
    pooled = build_model(ModelConfig(**kw, pool_before_norm=True), 2).eval()
    assert [p.shape for p in plain.parameters()] == [p.shape for p in pooled.parameters()]
    assert list(plain.state_dict()) != list(pooled.state_dict())  # the norms moved: other layer indices
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, positive scales
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    with torch.no_grad():
        for a, b in zip(plain.parameters(), pooled.parameters(), strict=True):
            b.copy_(a)
        for a, b in zip(plain.buffers(), pooled.buffers(), strict=True):
            b.copy_(a)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(pooled(x), plain(x), rtol=1e-5, atol=1e-5)
    # The norm really runs on pooled maps: a quarter of the pixels of the same layer in the plain order.
    seen = {}
    for name, model in (("plain", plain), ("pooled", pooled)):
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.register_forward_hook(lambda m, i, o, name=name: seen.update({name: i[0].shape[-1]}))
        model(x)
    assert seen["pooled"] * 2 == seen["plain"] if convs == 1 else seen["pooled"] == seen["plain"]


def test_unknown_model_names_the_key():
    # The config checks model.name against MODEL_NAMES (no torch import); they must be the registry's names.
    assert set(MODELS) == set(MODEL_NAMES) == {"scratch_cnn", "inception_v3"}
    with pytest.raises(ConfigError, match="model.name='resnet'"):
        ModelConfig(name="resnet")


@pytest.fixture(scope="module")
def imagenet_state_file(tmp_path_factory):
    """A torchvision-shaped InceptionV3 state_dict (1000 classes) saved by the test: no network here."""
    torch.manual_seed(0)
    net = tv_inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("w") / "inception_v3.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_inception_loads_state_dict_and_replaces_heads(imagenet_state_file):
    path, saved = imagenet_state_file
    model = build_model(ModelConfig(name="inception_v3", weights=str(path)), num_classes=2)
    got = model.net.state_dict()
    assert torch.equal(got["Mixed_7c.branch1x1.conv.weight"], saved["Mixed_7c.branch1x1.conv.weight"])
    assert torch.equal(got["Conv2d_1a_3x3.bn.running_mean"], saved["Conv2d_1a_3x3.bn.running_mean"])
    assert got["fc.weight"].shape == (2, 2048) and got["AuxLogits.fc.weight"].shape == (2, 768)
    assert model.net.transform_input  # torchvision's ImageNet weights expect it


def test_inception_forward_backward_with_aux_loss_and_frozen_backbone(imagenet_state_file):
    path, _ = imagenet_state_file
    model = build_model(ModelConfig(name="inception_v3", weights=str(path), freeze_backbone=True), num_classes=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"net.fc.weight", "net.fc.bias", "net.AuxLogits.fc.weight", "net.AuxLogits.fc.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    x, y = torch.randn(2, 3, 299, 299), torch.tensor([0, 1])
    outputs = model(x)
    assert isinstance(outputs, tuple) and outputs[1].shape == (2, 2)  # aux logits in training
    loss, logits = classification_loss(outputs, y, label_smoothing=0.0, aux_weight=0.4)
    main_only, _ = classification_loss(outputs[0], y, label_smoothing=0.0, aux_weight=0.4)
    aux_only = torch.nn.functional.cross_entropy(outputs[1], y)
    assert torch.allclose(loss, main_only + 0.4 * aux_only)
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    # Only the heads move: weights AND BatchNorm running statistics of the backbone stay as loaded.
    assert changed == {"net.fc.weight", "net.fc.bias"} | ({"net.AuxLogits.fc.weight", "net.AuxLogits.fc.bias"})
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 2)  # plain logits in eval


def test_inception_trainable_blocks():
    model = build_model(ModelConfig(name="inception_v3", trainable_blocks=2), num_classes=2)
    trainable_blocks = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_blocks == {"Mixed_7b", "Mixed_7c", "fc", "AuxLogits"}


def test_inception_bad_weights_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        build_model(ModelConfig(name="inception_v3", weights=str(tmp_path / "missing.pth")), 2)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ConfigError, match="wrong.pth"):
        build_model(ModelConfig(name="inception_v3", weights=str(wrong)), 2)
    pickled = tmp_path / "pickled.pth"
    torch.save({"net": torch.nn.Linear(1, 1)}, pickled)  # a pickled module, not a state_dict: refused
    with pytest.raises(ConfigError, match="pickled.pth"):
        build_model(ModelConfig(name="inception_v3", weights=str(pickled)), 2)


def test_imagenet_offline_suggests_a_local_path(monkeypatch, tmp_path):
    # No network in tests: point the torch hub cache at an empty folder and block downloads.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"model\.weights=/path/to"):
        build_model(ModelConfig(name="inception_v3", weights="imagenet"), 2)
