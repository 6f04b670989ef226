"""Train a classifier, clean or poisoned with a backdoor trigger, and measure what it learnt."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn

from malex.attacks.backdoor.base import PoisonConfig, Trigger
from malex.attacks.backdoor.poison import attack_success_rate, poison_split
from malex.data.dataset import Dataset
from malex.device import select_device
from malex.errors import ConfigError
from malex.models import build_model
from malex.models.inference import accuracy
from malex.models.train import TrainConfig, train_classifier


#: a registered architecture's name, or a factory (input_shape (C, H, W), num_classes) -> model of one's own
Architecture = Union[str, Callable[[tuple[int, int, int], int], nn.Module]]


@dataclass(frozen=True)
class TrainedModel:
    """A trained model (in eval mode) and the facts of its training."""

    model: nn.Module
    arch: str
    clean_accuracy: float  # on the dataset's test split
    attack_success_rate: float | None  # on the trigger's source test inputs (default: non-target); None: clean
    trigger: Trigger | None
    poison: PoisonConfig | None
    seconds: float  # wall time of building, poisoning and training
    cpu_seconds: float  # CPU time of this process (all threads) over the same steps

    @property
    def target(self) -> int | None:
        """The backdoor's target label (None: a clean model)."""
        return None if self.poison is None else self.poison.target

    def info(self) -> dict[str, Any]:
        """JSON-able facts for a model file's info: the trigger, target and rate when poisoned, then the
        clean accuracy and, when poisoned, the attack success rate."""
        if self.trigger is None or self.poison is None:
            return {"clean_accuracy": self.clean_accuracy}
        return {"trigger": self.trigger.describe(), "target": self.poison.target, "rate": self.poison.rate,
                "clean_accuracy": self.clean_accuracy, "attack_success_rate": self.attack_success_rate}


def train_model(data: Dataset, arch: Architecture, train: TrainConfig, trigger: Trigger | None = None,
                poison: PoisonConfig | None = None, *, device: torch.device | str = "cpu",
                init_seed: int | None = None, progress: bool = True) -> TrainedModel:
    """Build `arch` for `data` (a registered architecture's name, or a factory called with the data's image
    shape and class count), train it on `data.train` (poisoned by `trigger` with `poison` when both are given)
    and measure it on `data.test`.

    The initial weights come from the global torch RNG seeded with `init_seed` (default: `train.seed`);
    the poisoned inputs are chosen by `poison.seed` and the training order by `train.seed`, so the same
    settings give the same weights.
    """
    if (trigger is None) != (poison is None):
        raise ConfigError(f"trigger is {trigger!r} and poison is {poison!r}; expected both (a poisoned model) "
                          "or neither (a clean model)")
    _check_target(data, poison)
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(train.seed if init_seed is None else init_seed)
    model = (build_model(arch, data.image_shape, data.num_classes) if isinstance(arch, str)
             else arch(data.image_shape, data.num_classes)).to(
        select_device(device) if isinstance(device, str) else device)
    split = data.train if trigger is None else poison_split(data.train, trigger, poison)[0]
    train_classifier(model, split, train, progress=progress)
    name = arch if isinstance(arch, str) else f"{arch.__module__}:{getattr(arch, '__qualname__', repr(arch))}"
    return _measured(model, name, data, trigger, poison, start, cpu_start)


def fine_tune_model(model: nn.Module, arch: str, data: Dataset, train: TrainConfig, trigger: Trigger,
                    poison: PoisonConfig, *, progress: bool = True) -> TrainedModel:
    """A copy of the trained `model` (a supplier's starting point, e.g. a public clean model) trained further on
    `data.train` poisoned by `trigger` with `poison`, with `train`'s settings, and measured on `data.test`
    (`model` itself is left as it was). `arch` names the network in the result."""
    _check_target(data, poison)
    start, cpu_start = time.perf_counter(), time.process_time()
    tuned = copy.deepcopy(model)
    train_classifier(tuned, poison_split(data.train, trigger, poison)[0], train, progress=progress)
    return _measured(tuned, arch, data, trigger, poison, start, cpu_start)


def _check_target(data: Dataset, poison: PoisonConfig | None) -> None:
    if poison is not None and not 0 <= poison.target < data.num_classes:
        raise ConfigError(f"backdoor target {poison.target} is not a class of {data.name}; expected "
                          f"0..{data.num_classes - 1}")


def _measured(model: nn.Module, arch: str, data: Dataset, trigger: Trigger | None, poison: PoisonConfig | None,
              start: float, cpu_start: float) -> TrainedModel:
    """The trained model with its clean test accuracy, ASR and the wall and CPU time since `start`."""
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    asr = None if trigger is None else attack_success_rate(model, data.test, trigger, poison.target)
    return TrainedModel(model, arch, accuracy(model, data.test.x, data.test.y), asr, trigger, poison, seconds,
                        cpu_seconds)
