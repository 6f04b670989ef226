"""Models: architectures by name, safe model files, inference that keeps the model's mode, training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from malex.data.dataset import Split
from malex.errors import ConfigError, ModelFileError
from malex.models import ARCHITECTURES, build_model, load_model, read_description, save_model
from malex.models.inference import accuracy, predict, predict_logits
from malex.models.train import TrainConfig, _random_shift, train_classifier

SHAPES = {"digits_cnn": (1, 8, 8), "mnist_cnn": (1, 28, 28), "gtsrb_vgg": (3, 32, 32), "cifar_resnet": (3, 32, 32)}


def test_every_registered_architecture_is_covered():
    assert set(ARCHITECTURES) == set(SHAPES)


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_architecture_maps_nchw_to_logits(arch):
    torch.manual_seed(0)
    shape = SHAPES[arch]
    model = build_model(arch, shape, 7)
    assert model.input_shape == shape and model.num_classes == 7
    logits = model.eval()(torch.rand(3, *shape))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    # the declared probe points exist in the model
    names = dict(model.named_modules())
    assert model.probe_layers and all(p in names for p in model.probe_layers)


def test_architecture_follows_given_shape_and_channels():
    model = build_model("digits_cnn", (3, 10, 12), 4)
    assert model.eval()(torch.rand(2, 3, 10, 12)).shape == (2, 4)
    assert model.normalize.mean.shape == (1, 3, 1, 1)  # one constant broadcast to 3 channels


def test_build_model_unknown_arch_and_bad_settings():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet9'") as info:
        build_model("resnet9", (1, 8, 8), 10)
    assert "digits_cnn" in str(info.value)  # lists what is available
    with pytest.raises(ConfigError, match="num_classes is 1"):
        build_model("digits_cnn", (1, 8, 8), 1)
    with pytest.raises(ConfigError, match="2 normalisation constants for 3 channels"):
        build_model("gtsrb_vgg", (3, 32, 32), 10, mean=(0.1, 0.2))


def test_build_model_input_the_arch_cannot_take_is_config_error():
    # was a RuntimeError from conv2d / torch.zeros
    with pytest.raises(ConfigError, match=r"\(1, 8, 8\)"):
        build_model("mnist_cnn", (1, 8, 8), 10)
    with pytest.raises(ConfigError):
        build_model("digits_cnn", (1, -8, 8), 10)


# ------------------------------------------------------------------------------------------------ model files


def test_save_load_round_trip(tmp_path, digits_model):
    path = save_model(digits_model, tmp_path / "sub" / "m.safetensors", "digits_cnn", info={"note": "hi"})
    assert path.is_file() and not list(path.parent.glob("*.partial"))
    loaded, desc = load_model(path)
    assert not loaded.training
    assert desc["arch"] == "digits_cnn" and desc["input_shape"] == [1, 8, 8] and desc["num_classes"] == 10
    assert desc["info"] == {"note": "hi"}
    assert read_description(path) == desc
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(predict_logits(digits_model, x), predict_logits(loaded, x))


def test_round_trip_keeps_custom_normalisation(tmp_path):
    torch.manual_seed(1)
    model = build_model("digits_cnn", (1, 8, 8), 3, mean=(0.7,), std=(0.1,))
    save_model(model, tmp_path / "m.safetensors", "digits_cnn")
    loaded, _ = load_model(tmp_path / "m.safetensors")
    assert float(loaded.normalize.mean) == pytest.approx(0.7) and float(loaded.normalize.std) == pytest.approx(0.1)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(predict_logits(model, x), predict_logits(loaded, x))


def test_save_refuses_to_overwrite(tmp_path, digits_model):
    path = save_model(digits_model, tmp_path / "m.safetensors", "digits_cnn")
    before = path.read_bytes()
    torch.manual_seed(5)
    other = build_model("digits_cnn", (1, 8, 8), 10)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(other, path, "digits_cnn")
    assert path.read_bytes() == before
    save_model(other, path, "digits_cnn", overwrite=True)
    assert path.read_bytes() != before
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(predict_logits(load_model(path)[0], x), predict_logits(other, x))


def test_save_unknown_arch_writes_nothing(tmp_path, digits_model):
    with pytest.raises(ConfigError, match="unknown architecture"):
        save_model(digits_model, tmp_path / "m.safetensors", "nope")
    assert not list(tmp_path.iterdir())


def _description(**changes):
    desc = {"format": "malex-model", "version": 1, "arch": "digits_cnn", "input_shape": [1, 8, 8],
            "num_classes": 10, "info": {}}
    desc.update(changes)
    return {"malex": json.dumps(desc)}


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _assert_model_error(path, pattern):
    with pytest.raises(ModelFileError, match=pattern) as info:
        load_model(path)
    assert path.name in str(info.value)


def test_truncated_file_rejected(tmp_path, digits_model):
    path = save_model(digits_model, tmp_path / "m.safetensors", "digits_cnn")
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 4, 20, 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        _assert_model_error(bad, "not a readable safetensors file|unreadable")


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, bytes(range(256)) * 8])
def test_random_bytes_rejected(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    _assert_model_error(path, "not a readable safetensors file")
    with pytest.raises(ModelFileError):
        read_description(path)


def test_missing_file_rejected(tmp_path):
    _assert_model_error(tmp_path / "none.safetensors", "no such model file")


def test_foreign_safetensors_rejected(tmp_path, digits_model):
    path = tmp_path / "foreign.safetensors"
    save_file(_state(digits_model), str(path))
    _assert_model_error(path, "without a malex description")
    save_file(_state(digits_model), str(path), metadata={"framework": "pt"})
    _assert_model_error(path, "without a malex description")


@pytest.mark.parametrize("meta, pattern", [
    ({"malex": "{not json"}, "not valid JSON"),
    ({"malex": json.dumps(["a list"])}, "header format"),
    (_description(format="other-tool"), "header format is 'other-tool'"),
    (_description(version=2), "model format version 2"),
    (_description(arch="resnet9"), "does not name a buildable model"),
    (_description(num_classes=1), "does not name a buildable model"),
    (_description(input_shape=None), "does not name a buildable model"),
])
def test_bad_header_rejected(tmp_path, digits_model, meta, pattern):
    path = tmp_path / "bad.safetensors"
    save_file(_state(digits_model), str(path), metadata=meta)
    _assert_model_error(path, pattern)


def test_wrong_weight_shapes_rejected(tmp_path):
    five = build_model("digits_cnn", (1, 8, 8), 5)
    path = tmp_path / "shapes.safetensors"
    save_file(_state(five), str(path), metadata=_description(num_classes=10))
    _assert_model_error(path, r"weight head.4.weight has shape \(5, 256\); expected \(10, 256\)")


def test_missing_and_extra_weights_rejected(tmp_path, digits_model):
    state = _state(digits_model)
    del state["head.1.bias"]
    path = tmp_path / "missing.safetensors"
    save_file(state, str(path), metadata=_description())
    _assert_model_error(path, r"missing \['head.1.bias'\]")
    state = _state(digits_model)
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path), metadata=_description())
    _assert_model_error(path, r"unexpected \['extra.weight'\]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_rejected(tmp_path, digits_model, bad):
    state = _state(digits_model)
    state["features.2.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path), metadata=_description())
    _assert_model_error(path, "weight features.2.weight contains NaN or infinite values")


@pytest.mark.parametrize("arch, shape", [("mnist_cnn", [1, 8, 8]), ("digits_cnn", [1, -8, 8])])
def test_unbuildable_input_shape_in_header_rejected(tmp_path, digits_model, arch, shape):
    path = tmp_path / "shape.safetensors"
    save_file(_state(digits_model), str(path), metadata=_description(arch=arch, input_shape=shape))
    _assert_model_error(path, "does not name a buildable model|input shape")


# ------------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("training", [True, False])
def test_predict_and_accuracy_keep_training_flag(digits_model, training):
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,))
    digits_model.train(training)
    reference = digits_model.eval()(x).detach()
    digits_model.train(training)
    logits = predict_logits(digits_model, x)
    assert digits_model.training is training
    assert torch.allclose(logits, reference, atol=1e-6)  # dropout is off during inference
    assert torch.equal(predict(digits_model, x), reference.argmax(1))
    assert digits_model.training is training
    accuracy(digits_model, x, y)
    assert digits_model.training is training
    assert all(m.training is training for m in digits_model.modules())


def test_predict_logits_independent_of_batch_size(digits_model):
    x = torch.rand(23, 1, 8, 8)
    assert torch.allclose(predict_logits(digits_model, x, batch_size=4), predict_logits(digits_model, x), atol=1e-6)


class _FixedLogits(nn.Module):
    """Test double: returns preset logits row by row, whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)
        self.seen = 0

    def forward(self, x):
        out = self.table[self.seen : self.seen + x.shape[0]]
        self.seen += x.shape[0]
        return out


def test_accuracy_is_share_of_matching_labels():
    preds = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1])
    truth = torch.tensor([0, 1, 1, 2, 0, 0, 2, 1])  # 5 of 8 match
    model = _FixedLogits(nn.functional.one_hot(preds, 3).float())
    assert accuracy(model, torch.zeros(8, 1, 2, 2), truth, batch_size=3) == pytest.approx(5 / 8)


def test_predict_on_no_inputs_returns_empty(digits_model):
    # was an IndexError: argmax over dim 1 of the 1-D torch.empty(0) that predict_logits returned
    assert predict_logits(digits_model, torch.zeros(0, 1, 8, 8)).shape == (0, 10)
    assert predict(digits_model, torch.zeros(0, 1, 8, 8)).shape == (0,)


# -------------------------------------------------------------------------------------------------- training


def test_train_classifier_reaches_accuracy_on_digits_subset(digits):
    torch.manual_seed(0)
    model = build_model("digits_cnn", digits.image_shape, digits.num_classes)
    before = accuracy(model, digits.test.x, digits.test.y)
    out = train_classifier(model, digits.train.subset(slice(0, 400)), TrainConfig(epochs=5), progress=False)
    assert out is model and not model.training
    acc = accuracy(model, digits.test.x, digits.test.y)
    assert before < 0.3
    assert acc >= 0.80, f"test accuracy {acc:.3f} after 5 epochs on 400 digits; expected >= 0.80 (seen ~0.90)"


def test_train_classifier_deterministic_by_seed(digits):
    small = digits.train.subset(slice(0, 128))
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model("digits_cnn", (1, 8, 8), 10)
        train_classifier(model, small, TrainConfig(epochs=1, batch_size=32, shift=1, seed=7), progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(lr=0.0), dict(shift=-1)])
def test_train_config_rejects_bad_settings(bad):
    with pytest.raises(ConfigError, match="invalid training settings"):
        TrainConfig(**bad)


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img (C, H, W) moved down by dy and right by dx, zero filled."""
    out = torch.zeros_like(img)
    _, h, w = img.shape
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        img[:, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out


@pytest.mark.parametrize("shift", [1, 2])
def test_random_shift_translates_each_image_within_bound(shift):
    n, c, h, w = 200, 3, 6, 7
    x = torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(n, c, h, w)  # every pixel distinct, > 0
    out = _random_shift(x, shift, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    offsets = set()
    for i in range(n):
        matches = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
                   if torch.equal(out[i], _shifted(x[i], dy, dx))]
        assert len(matches) == 1, f"image {i} is not a translation of its input by at most {shift} px"
        offsets.add(matches[0])
    assert len(offsets) == (2 * shift + 1) ** 2  # every offset is drawn over 200 images
    assert torch.equal(_random_shift(x, 0, torch.Generator().manual_seed(0)), x)


def test_random_shift_deterministic_by_generator():
    x = torch.rand(10, 1, 8, 8)
    a = _random_shift(x, 2, torch.Generator().manual_seed(3))
    b = _random_shift(x, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, _random_shift(x, 2, torch.Generator().manual_seed(4)))


def test_split_subset_keeps_pairs():
    s = Split(torch.arange(5.0).view(5, 1, 1, 1), torch.arange(5))
    sub = s.subset(torch.tensor([4, 1]))
    assert len(sub) == 2 and sub.y.tolist() == [4, 1] and sub.x.flatten().tolist() == [4.0, 1.0]
