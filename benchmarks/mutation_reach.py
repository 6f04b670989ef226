"""Which weights should model mutation fuzz when the dense head is ONE dense layer? Measured on the digits.

Run by hand from the repository root (a few minutes on 2 CPU cores):

    python benchmarks/mutation_reach.py --seeds 0 1 2 --out benchmarks/results/mutation_reach.md

For each seed, examples/own_model's TinyResNet (a residual block, a global-average-pool head of one dense layer
`fc`) is trained on the digits clean and BadNets-poisoned (2x2 corner square, target 1, 10% poisoned; the recipe
of configs/own_model_digits.toml). Each variant fuzzes a set of weights with the mutation test's Gaussian rule
(W' = W + N(mean(W), (max(W) r)^2)), its strength r bisected until the mean clean label-change rate (LCR) is 0.6
on the validation split, and scores each input by one minus its LCR over 50 mutants (a LOW LCR is the backdoor
sign). Reported: the AUROC of BadNets trigger inputs (and of PGD examples on the clean model: a backdoor test
should not fire on them) against correctly classified clean test inputs. A control perturbs the pooled features
instead of weights, and the last rows are the shipped `mutation_bd` (sequential test, up to 100 mutants) with
`through_last_conv` off and on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ is importable from the repository root

from examples.own_model.net import TinyResNet  # noqa: E402
from malex.attacks.adversarial import craft_successful, make_adversarial  # noqa: E402
from malex.attacks.backdoor import PoisonConfig, make_trigger, successful_triggered, train_model  # noqa: E402
from malex.data import load_dataset  # noqa: E402
from malex.data.dataset import stratified_split  # noqa: E402
from malex.detectors import make_detector  # noqa: E402
from malex.metrics import auroc  # noqa: E402
from malex.models.classifier import Normalize  # noqa: E402
from malex.models.inference import predict  # noqa: E402
from malex.models.train import TrainConfig  # noqa: E402
from malex.probe import Probe  # noqa: E402
from tables import command_line, emit  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

MUTANTS = 50
TARGET_LCR = 0.6


def net(shape: tuple[int, int, int], classes: int) -> nn.Module:
    return nn.Sequential(Normalize([0.3], [0.4]), TinyResNet(shape[0], 16, classes))


def weight_lcr(model: nn.Module, names: list[str]) -> Callable[[float, torch.Tensor], np.ndarray]:
    """LCR over MUTANTS Gaussian fuzzings of the weights `names`, at strength r."""
    params = dict(model.named_parameters())

    def lcr(r: float, x: torch.Tensor) -> np.ndarray:
        base = predict(model, x)
        flips = torch.zeros(len(x))
        with torch.no_grad():
            for i in range(MUTANTS):
                gen = torch.Generator().manual_seed(i)
                mutant = {k: params[k] + torch.randn(params[k].shape, generator=gen) * float(params[k].max()) * r
                          + float(params[k].mean()) for k in names}
                flips += (functional_call(model, {**params, **mutant}, (x,)).argmax(1) != base).float()
        return (flips / MUTANTS).numpy()

    return lcr


def feature_lcr(model: nn.Module) -> Callable[[float, torch.Tensor], np.ndarray]:
    """LCR over MUTANTS draws of Gaussian noise of std r added to the pooled features the dense layer reads."""
    layer = "1.fc:in"
    fc = model.get_submodule("1.fc")

    def lcr(r: float, x: torch.Tensor) -> np.ndarray:
        h = Probe(model, [layer]).run(x).layer(layer)
        with torch.no_grad():
            base = fc(h).argmax(1)
            flips = sum((fc(h + torch.randn(h.shape, generator=torch.Generator().manual_seed(i)) * r).argmax(1) != base)
                        .float() for i in range(MUTANTS))
        return (flips / MUTANTS).numpy()

    return lcr


def calibrated(lcr: Callable[[float, torch.Tensor], np.ndarray], fit_x: torch.Tensor) -> float:
    """The r at which the mean clean LCR on (up to 256 of) `fit_x` is TARGET_LCR, by bisection in log r."""
    lo, hi = np.log(1e-3), np.log(100.0)
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        mean = lcr(float(np.exp(mid)), fit_x[:256]).mean()
        if abs(mean - TARGET_LCR) < 0.01:
            break
        lo, hi = (mid, hi) if mean < TARGET_LCR else (lo, mid)
    return float(np.exp(mid))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = p.parse_args()
    torch.set_num_threads(1)
    trigger = make_trigger("badnets", size=2, margin=0)
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        data = load_dataset("digits", seed=seed)
        recipe = TrainConfig(epochs=40, lr=0.003, shift=1, seed=seed)
        clean_idx, source_idx = stratified_split(data.test.y, (0.5, 0.5), seed)
        pool, sources = data.test.subset(clean_idx), data.test.subset(source_idx)
        pgd = make_adversarial("pgd", eps=0.2, steps=20, seed=0)
        for attack in ("BadNets", "PGD"):
            poisoned = attack == "BadNets"
            model = train_model(data, net, recipe, trigger if poisoned else None,
                                PoisonConfig(0.1, 1, seed) if poisoned else None, progress=False).model.eval()
            clean = pool.x[predict(model, pool.x) == pool.y]
            malicious = (successful_triggered(model, sources, trigger, 1, limit=1000).x if poisoned else
                         craft_successful(pgd, model, sources.x, sources.y, limit=1000, progress=False).x)
            convs = ["1.block.3.weight"]
            variants = {"the dense layer (fc)": weight_lcr(model, ["1.fc.weight"]),
                        "the last convolution": weight_lcr(model, convs),
                        "the last convolution and fc": weight_lcr(model, convs + ["1.fc.weight"]),
                        "the last block's convolutions and fc": weight_lcr(
                            model, ["1.block.0.weight", "1.block.3.weight", "1.fc.weight"]),
                        "every conv and dense weight": weight_lcr(
                            model, [n for n, w in model.named_parameters() if w.dim() >= 2]),
                        "control: noise on the pooled features": feature_lcr(model)}
            for name, lcr in variants.items():
                r = calibrated(lcr, data.val.x)
                rows.setdefault(name, {}).setdefault(attack, []).append(
                    auroc(1 - lcr(r, clean), 1 - lcr(r, malicious)))
            for through in (False, True):
                det = make_detector("mutation_bd", model, through_last_conv=through)
                probe = Probe(model, det.layers())
                det.fit(probe.run(data.val.x))
                name = f"shipped mutation_bd, through_last_conv={through} ({det.target.reach})"
                rows.setdefault(name, {}).setdefault(attack, []).append(
                    auroc(det.score(probe.run(clean)), det.score(probe.run(malicious))))
            print(f"seed {seed} {attack}: " + ", ".join(f"{k}: {v[attack][-1]:.3f}" for k, v in rows.items()),
                  flush=True)
    lines = [command_line(), "",
             f"AUROC against clean inputs, mean ± std over seeds {', '.join(map(str, args.seeds))} (per seed in "
             "brackets).", "", "| mutants fuzz | BadNets (want high) | PGD on the clean model (want low) |",
             "|---|---:|---:|"]
    for name, by_attack in rows.items():
        cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f} "
                 f"({' / '.join(f'{a:.3f}' for a in v)})" for v in (by_attack["BadNets"], by_attack["PGD"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
