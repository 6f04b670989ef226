"""Train examples/own_model/net.py's TinyResNet on the embedded digits and save its state_dict.

    python examples/own_model/train.py model.pt

The network expects inputs normalised by MEAN and STD (in [0, 1] pixel units), as many pretrained networks do;
training runs it behind that normalisation, and the file holds the bare network's weights only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `examples.own_model`

from examples.own_model.net import TinyResNet  # noqa: E402
from malex.data import load_digits  # noqa: E402
from malex.models import Normalize  # noqa: E402
from malex.models.inference import accuracy  # noqa: E402
from malex.models.train import TrainConfig, train_classifier  # noqa: E402

MEAN, STD = 0.3, 0.4


def main(out: str) -> None:
    torch.set_num_threads(2)
    data = load_digits(seed=0)
    net = TinyResNet(channels=1, width=16, num_classes=10)
    trained = train_classifier(nn.Sequential(Normalize([MEAN], [STD]), net), data.train,
                               TrainConfig(epochs=15, lr=3e-3, shift=1, seed=0), progress=False)
    torch.save(net.state_dict(), out)
    print(f"test accuracy {accuracy(trained, data.test.x, data.test.y):.3f}; wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "model.pt")
