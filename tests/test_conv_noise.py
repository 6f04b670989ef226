"""Sampling a fuzzed convolution's output noise per input (`malex.detectors.conv_noise`): the factors are those of
the patches' covariance for every geometry, a mutant is the same in every call, and the mutation test on a
residual net with a global-pool head gives the label-change rates that running the fuzzed weights gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from malex.detectors import make_detector
from malex.detectors.conv_noise import ConvOutputNoise
from malex.models.tail import Noisy, run_mutants
from malex.probe import Probe

from test_foreign_heads import ResidualGAP


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 4, 3, padding=1),
    nn.Conv2d(6, 4, 3, stride=2, padding=1),
    nn.Conv2d(6, 4, 3, dilation=2, padding=2),
    nn.Conv2d(6, 4, (3, 2), padding=(1, 0), groups=2),
    nn.Conv2d(6, 6, 1),
])
def test_the_factors_are_those_of_the_patches_covariance(conv):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(5, 6, 7, 7)).double()
    x[0] = 0  # an input whose patches are all zero: a singular covariance, factorised without NaN
    noise = ConvOutputNoise(conv.double(), seed=0)
    lt, sums = noise.factors(x)
    patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, C * k, npos)
    patches = patches.view(5, conv.groups, -1, patches.shape[-1])  # channels are contiguous per group
    gram = patches.transpose(-1, -2) @ patches
    assert torch.allclose(lt.transpose(-1, -2) @ lt, gram, rtol=1e-4, atol=1e-4 * gram.abs().max())
    assert torch.allclose(sums, patches.sum(2)) and not lt.isnan().any() and lt[0].abs().max() < 1e-100
    assert conv(x).shape[-2:].numel() == lt.shape[-1]


def test_the_mean_of_the_noise_is_the_shift_of_the_mean_weight():
    conv = nn.Conv2d(3, 5, 3, padding=1, groups=1, bias=False).double()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    noise = ConvOutputNoise(conv, seed=0)
    _, sums = noise.factors(x)
    shifted = F.conv2d(x, torch.full_like(conv.weight, 0.25), padding=1).flatten(2)
    assert torch.allclose(noise.mean_shift(sums, 0.25), shifted)


def test_a_mutant_is_the_same_in_every_call():
    noise = ConvOutputNoise(nn.Conv2d(4, 3, 3, padding=1), seed=7)
    lt, _ = noise.factors(torch.rand(3, 4, 5, 5))
    rank = lt.shape[2]
    assert torch.equal(noise.draw(range(2, 5), rank), noise.draw(range(0, 5), rank)[2:5])
    assert not torch.equal(ConvOutputNoise(noise.conv, seed=8).draw(range(3), rank), noise.draw(range(3), rank))
    u = noise.draw(range(3), rank)
    assert torch.allclose(noise.sample(lt[1:], u, 0.1), noise.sample(lt, u, 0.1)[:, 1:], atol=1e-6)  # per input
    assert torch.allclose(noise.sample(lt, u[1:], 0.1), noise.sample(lt, u, 0.1)[1:], atol=1e-6)  # per mutant


def test_only_zero_padded_2d_convolutions_with_numeric_padding_are_sampled():
    assert ConvOutputNoise.supports(nn.Conv2d(2, 2, 3))
    assert not ConvOutputNoise.supports(nn.Conv2d(2, 2, 3, padding="same"))
    assert not ConvOutputNoise.supports(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert not ConvOutputNoise.supports(nn.Conv1d(2, 2, 3))
    with pytest.raises(ValueError, match="Conv2d"):
        ConvOutputNoise(nn.Conv1d(2, 2, 3), seed=0)


def test_the_rest_of_the_tail_gives_the_models_logits_from_the_convolutions_output():
    model = ResidualGAP(4).eval()
    tail = make_detector("mutation_bd", model).target.tail
    x = torch.rand(6, 1, 8, 8)
    obs = Probe(model, list(tail.inputs)).run(x)
    values = [obs.layer(n) for n in tail.inputs]
    with torch.no_grad():
        out = model.get_submodule(tail.start)(values[tail.conv_input])
        logits = tail.rest(out, *(values[i] for i in tail.rest_inputs))
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert tail.rest_inputs == (1,)  # the skip connection; the convolution's own input is not read again


def test_sampled_label_change_rates_are_those_of_the_fuzzed_weights():
    """Per input, 300 mutants each way: binomial noise alone gives a mean absolute difference of about 0.03, and
    the mean over inputs moves by about 0.02 with the draw (each way's mutants are shared by all inputs)."""
    torch.manual_seed(0)
    model = ResidualGAP(4).eval()
    det = make_detector("mutation_bd", model, max_mutants=300, sequential=False, target_clean_lcr=None,
                        strength=0.5)
    x = torch.rand(80, 1, 8, 8)
    obs = Probe(model, det.layers()).run(x)
    prepared = det._prepare(det.inputs_of(obs))
    assert prepared is not None  # 72 values per patch against 64 positions: sampled
    assert det.layers()[-1] == det.target.tail.start  # the probe captures the convolution's output ...
    captured = det._prepare(det.inputs_of(obs), obs.layer(det.target.tail.start))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(prepared, captured))  # ... which is not run again
    sampled = det.test(obs).lcr
    weights = det._flips(det.inputs_of(obs), obs.pred, range(300)).double().mean(0).numpy()
    assert 0.1 < weights.mean() < 0.9 and weights.std() > 0.05  # rates that a wrong law would miss
    assert abs(sampled.mean() - weights.mean()) < 0.04
    assert np.abs(sampled - weights).mean() < 0.05 and np.corrcoef(sampled, weights)[0, 1] > 0.9


@pytest.mark.parametrize("mutants", [1, 3])
def test_the_mutants_run_gives_the_tails_outputs_with_batch_norms_and_sums_folded(mutants):
    """ResidualGAP's tail after its last convolution: a batch norm, the sum with the skip connection (a per-input
    value), GELU, pooling and the dense layer; the first two act on the per-input part alone."""
    torch.manual_seed(0)
    model = ResidualGAP(4)
    model.block[4].running_var.uniform_(0.5, 2.0)  # batch-norm statistics other than the defaults
    model.block[4].running_mean.uniform_(-1.0, 1.0)
    model.eval()
    tail = make_detector("mutation_bd", model).target.tail
    obs = Probe(model, list(tail.inputs)).run(torch.rand(5, 1, 8, 8))
    values = [obs.layer(n) for n in tail.inputs]
    base = model.get_submodule(tail.start)(values[tail.conv_input]).detach()
    noise = torch.randn(mutants, *base.shape)
    others = [values[i] for i in tail.rest_inputs]
    rows = []
    hook = model.block[4].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        folded = run_mutants(tail.rest, mutants, Noisy(base, noise), *others)
    hook.remove()
    assert rows == [5]  # the batch norm ran on the 5 inputs' own values, not on every mutant's
    with torch.no_grad():
        plain = tail.rest((base.unsqueeze(0) + noise).flatten(0, 1), *(v.repeat(mutants, 1, 1, 1) for v in others))
    assert torch.allclose(folded, plain, atol=1e-5)


def test_the_light_tail_fit_finds_the_strength_of_the_full_fit_at_a_fraction_of_the_mutants():
    torch.manual_seed(0)
    model = ResidualGAP(4).eval()
    obs = Probe(model, make_detector("mutation_bd", model).layers()).run(torch.rand(700, 1, 8, 8))
    fitted, evaluations = {}, {}
    for light in (True, False):
        det = make_detector("mutation_bd", model, light_tail_fit=light, target_clean_lcr=0.2)  # one this net reaches
        counted = []
        run = det._sampled_flips
        det._sampled_flips = lambda values, base, ids: counted.append(len(ids) * len(base)) or run(values, base, ids)
        fitted[light] = det.fit(obs)
        evaluations[light] = sum(counted)
    light, full = fitted[True], fitted[False]
    assert abs(np.log(light.strength / full.strength)) < 0.25, (light.strength, full.strength)
    assert abs(light.clean_lcr_mean_ - 0.2) < 0.03 and abs(full.clean_lcr_mean_ - 0.2) < 0.03
    assert evaluations[True] * 3 < evaluations[False], evaluations  # 512 inputs x 100 instead of 700 x 100, and so on


class ScaledTail(nn.Module):
    """A tail that reads a parameter through a function and joins a per-input value to the mutants' values."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.mixing = nn.Parameter(torch.randn(8, 8, 1, 1) / 3)
        self.norm = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = F.conv2d(self.conv(h), self.mixing)  # a function of a parameter: the parameter is not repeated per mutant
        y = self.norm(torch.cat([y, h], dim=1))  # a per-input value joined to every mutant's: repeated
        return self.fc(torch.relu(y).mean((2, 3)))


def test_the_mutants_run_keeps_constants_and_repeats_per_input_values():
    torch.manual_seed(0)
    model = ScaledTail().eval()
    tail = make_detector("mutation_bd", model).target.tail
    assert tail is not None and tail.start == "conv"
    obs = Probe(model, list(tail.inputs)).run(torch.rand(4, 1, 6, 6))
    values = [obs.layer(n) for n in tail.inputs]
    base = model.conv(values[tail.conv_input]).detach()
    noise = torch.randn(3, *base.shape)
    others = [values[i] for i in tail.rest_inputs]
    with torch.no_grad():
        folded = run_mutants(tail.rest, 3, Noisy(base, noise), *others)
        plain = tail.rest((base.unsqueeze(0) + noise).flatten(0, 1), *(v.repeat(3, 1, 1, 1) for v in others))
    assert torch.allclose(folded, plain, atol=1e-5)


@pytest.mark.parametrize("relu", [nn.ReLU(), nn.GELU()])
def test_the_mutants_run_matches_the_tail_with_an_activation_right_after_the_sum(relu):
    """conv -> batch norm -> ReLU (run in place on the values formed for it) or GELU -> pool -> dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                          nn.BatchNorm2d(6), relu, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    model[3].running_var.uniform_(0.5, 2.0)
    model.eval()
    tail = make_detector("mutation_bd", model).target.tail
    obs = Probe(model, list(tail.inputs)).run(torch.rand(4, 1, 6, 6))
    values = [obs.layer(n) for n in tail.inputs]
    base = model[2](values[tail.conv_input]).detach()
    noise = torch.randn(2, *base.shape)
    with torch.no_grad():
        folded = run_mutants(tail.rest, 2, Noisy(base, noise), *(values[i] for i in tail.rest_inputs))
        plain = tail.rest((base.unsqueeze(0) + noise).flatten(0, 1))
    assert torch.allclose(folded, plain, atol=1e-5) and tail.rest_inputs == ()
