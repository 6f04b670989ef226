"""The default guard in front of a CIFAR-10 architecture malex does not ship, against malex's own cifar_resnet.

Run by hand from the repository root (not in CI; about an hour on 2 CPU cores, the models cached):

    python benchmarks/foreign_cifar.py --out benchmarks/results/foreign_cifar.md

`ResNetGAP` is defined here: a ResNet-18-style net at 32x32 (3x3 stem, three stages of two basic blocks with
batch norm, ReLU and projection shortcuts, widths 32-64-128), global average pooling and one dense layer `fc`,
normalisation inside. It is trained clean and BadNets-poisoned (3x3 white square, 1-pixel margin, 10% of the
training inputs relabelled to 0) with configs/cifar10_cpu.toml's recipe (15 epochs, lr 0.002, batch 128,
shift 4), and malex's `cifar_resnet` clean with the same recipe (cached under cache/foreign-cifar/). The splits
and the protocol are the study's: the guard (default detectors, 5% FPR) is fitted on 3,000 clean validation
inputs; up to 1,000 correctly classified clean test inputs; up to 1,000 successful PGD-Linf examples (eps 8/255,
step 2/255, 20 steps) of correctly classified sources on the clean model, and up to 1,000 non-target sources with
the trigger that the poisoned model labels 0. Reported: each model's accuracy and ASR, the AUROC of the guard and
of each of its detectors, the guard's fit time (two threads, median of 3 fits) beside cifar_resnet's on the same inputs, and the
screening time of 256 clean inputs at batch 256 on one thread against the plain forward pass (median of 9
interleaved pairs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from malex.attacks.adversarial import craft_successful, make_adversarial
from malex.attacks.backdoor import PoisonConfig, make_trigger, successful_triggered, train_model
from malex.data import load_dataset
from malex.data.dataset import split_keeping_groups, stratified_split
from malex.guard import Guard, GuardConfig
from malex.metrics import auroc
from malex.models import build_model
from malex.models.classifier import Normalize
from malex.models.inference import predict, predict_logits
from malex.models.registry import CIFAR10_MEAN, CIFAR10_STD
from malex.models.train import TrainConfig

from foreign_head_speed import median_ratio  # benchmarks/ is on sys.path when run as a script
from tables import command_line, emit

RECIPE = TrainConfig(epochs=15, lr=0.002, batch_size=128, shift=4, seed=0)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNetGAP(nn.Module):
    """A ResNet-18-style net for 32x32 inputs with a global-average-pool head of one dense layer `fc`."""

    def __init__(self, input_shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.norm = Normalize(CIFAR10_MEAN, CIFAR10_STD)
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(32, 32, 1), BasicBlock(32, 32, 1))
        self.layer2 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64, 1))
        self.layer3 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.stem(self.norm(x)))))
        return self.fc(torch.flatten(self.avgpool(h), 1))


#: cache name -> (row label, architecture, poisoned with BadNets)
MODELS = {"resnetgap-clean": ("ResNetGAP clean", ResNetGAP, False),
          "resnetgap-badnets": ("ResNetGAP BadNets", ResNetGAP, True),
          "cifar_resnet-clean": ("cifar_resnet clean", "cifar_resnet", False)}


def cached(name: str, cache: Path, data, arch, trigger=None) -> tuple[nn.Module, dict]:
    """A model trained with RECIPE (poisoned with `trigger` when given), from the cache when it is there."""
    path = cache / f"{name}.safetensors"
    facts_path = cache / f"{name}.txt"
    if path.is_file() and facts_path.is_file():
        torch.manual_seed(0)
        model = build_model(arch, data.image_shape, data.num_classes) if isinstance(arch, str) else arch(
            data.image_shape, data.num_classes)
        model.load_state_dict(load_file(str(path)))
        acc, asr = (float(v) if v != "None" else None for v in facts_path.read_text().split())
        return model.eval(), {"clean_accuracy": acc, "attack_success_rate": asr}
    poison = PoisonConfig(0.1, 0, 0) if trigger is not None else None
    trained = train_model(data, arch, RECIPE, trigger, poison, progress=True)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(path))
    facts_path.write_text(f"{trained.clean_accuracy} {trained.attack_success_rate}")
    print(f"{name}: trained in {trained.seconds:.0f} s", flush=True)
    return trained.model, {"clean_accuracy": trained.clean_accuracy, "attack_success_rate": trained.attack_success_rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path("cache/foreign-cifar"))
    p.add_argument("--out", type=Path, default=None, help="also write the tables here (Markdown)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="which models to train (or read from the cache) and measure")
    p.add_argument("--bd-head-only", action="store_true",
                   help="mutation_bd fuzzes the dense head even when it is one dense layer (the behaviour before "
                        "through_last_conv), for a before/after on the same models")
    p.add_argument("--train-only", action="store_true",
                   help="only train the chosen models into the cache (run one process per model to use more cores)")
    args = p.parse_args()
    data = load_dataset("cifar10", seed=0)
    fit_idx, cal_idx = split_keeping_groups(data.val.y, data.val.groups, (0.5, 0.5), 0)
    fit_x = torch.cat([data.val.x[fit_idx[:2000]], data.val.x[cal_idx[:1000]]])
    fit_y = torch.cat([data.val.y[fit_idx[:2000]], data.val.y[cal_idx[:1000]]])
    clean_idx, source_idx = stratified_split(data.test.y, (0.5, 0.5), 0)
    clean_pool, sources = data.test.subset(clean_idx), data.test.subset(source_idx)
    trigger = make_trigger("badnets", size=3, margin=1)
    pgd = make_adversarial("pgd", eps=0.031, alpha=0.0078, steps=20, seed=0)

    models = {label: cached(name, args.cache, data, arch, trigger if poisoned else None)
              for name, (label, arch, poisoned) in MODELS.items() if name in args.models}
    if args.train_only:
        return
    lines = [command_line(), "",
             "| model | clean accuracy | ASR |", "|---|---:|---:|"]
    for name, (_, facts) in models.items():
        asr = facts["attack_success_rate"]
        lines.append(f"| {name} | {facts['clean_accuracy']:.3f} | {'–' if asr is None else f'{asr:.3f}'} |")
    lines += ["", "| model | attack | n clean / malicious | guard fit (s) | screen / forward at batch 256 | guard AUROC "
              "| " + " | ".join(GuardConfig().detectors) + " |", "|---|---|---:|---:|---:|---:|" +
              "---:|" * len(GuardConfig().detectors)]
    for name, attack in ((label, "BadNets" if poisoned else "PGD") for label, _, poisoned in MODELS.values()
                         if label in models):
        model = models[name][0]
        clean = clean_pool.x[predict(model, clean_pool.x) == clean_pool.y][:1000]
        if attack == "PGD":
            malicious = craft_successful(pgd, model, sources.x, sources.y, limit=1000, progress=True).x
        else:
            malicious = successful_triggered(model, sources, trigger, 0, limit=1000).x
        torch.set_num_threads(2)
        settings = {"mutation_bd": {"through_last_conv": False}} if args.bd_head_only else {}
        fits = []
        for _ in range(3):  # the same fit three times: the median time (a single fit of a few seconds is noisy)
            t0 = time.perf_counter()
            guard = Guard(model, GuardConfig(seed=0, progress=False, settings=settings)).fit(fit_x, fit_y)
            fits.append(time.perf_counter() - t0)
        fit_s = float(np.median(fits))
        a, b = guard.screen(clean), guard.screen(malicious)
        torch.set_num_threads(1)
        batch = clean[:256]
        ratio = median_ratio(lambda: guard.screen(batch), lambda: predict_logits(model, batch, 256), 9)
        torch.set_num_threads(2)
        per_detector = [f"{auroc(a.scores[d], b.scores[d]):.3f}" for d in guard.detectors]
        lines.append(f"| {name} | {attack} | {len(clean)} / {len(malicious)} | {fit_s:.1f} | {ratio:.2f}x | "
                     f"{auroc(a.guard_score, b.guard_score):.3f} | " + " | ".join(per_detector) + " |")
        print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
