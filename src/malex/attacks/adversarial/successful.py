"""Successful adversarial examples only: attack correctly classified sources until enough succeed."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from malex.attacks.adversarial.base import AdversarialAttack, is_count, require
from malex.attacks.crafted import Crafted
from malex.errors import InputError
from malex.models.inference import predict
from malex.progress import track


def craft_successful(attack: AdversarialAttack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     targeted: bool = False, limit: int | None = None, batch_size: int = 256,
                     progress: bool = False, label: str | None = None) -> Crafted:
    """Attack the sources in `x` (true labels `y`) that `model` classifies correctly and keep the successes.

    Untargeted: each correct source once. `targeted`: each correct source toward every other class in turn
    (source by source, targets y+1, y+2, ... modulo the number of classes). The attempts run in chunks of
    `batch_size` (one `attack.run` each, so a seeded attack restarts its generator per chunk); with `limit`,
    no chunk starts once `limit` successes are found, and the first `limit` are kept. `label` names the
    progress bar. The summary: success_rate over the attempts made, n kept, n_tried, and the mean L2 and
    Linf perturbation of the kept inputs (nan when none).
    """
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise InputError(f"sources x {tuple(x.shape)} and labels y {tuple(y.shape)}; expected (N, C, H, W) and (N,)")
    require(limit is None or is_count(limit), f"limit is {limit!r}; expected None or an int >= 1")
    require(is_count(batch_size), f"batch_size is {batch_size!r}; expected an int >= 1")
    correct = torch.nonzero(predict(model, x) == y).flatten()
    num_classes = int(getattr(model, "num_classes", int(y.max()) + 1))
    if targeted:
        index = correct.repeat_interleave(num_classes - 1)
        offsets = torch.arange(1, num_classes).repeat(len(correct))
        targets = (y[index] + offsets) % num_classes
    else:
        index, targets = correct, None
    wanted = len(index) if limit is None else limit
    kept_x, kept_i, kept_t, l2, linf = [], [], [], [], []
    tried = found = 0
    chunks = track(range(0, len(index), batch_size), label or f"{attack.name} (chunks)", enabled=progress)
    with contextlib.closing(chunks):
        for start in chunks:
            if found >= wanted:
                break
            sl = slice(start, start + batch_size)
            result = attack.run(model, x[index[sl]], y[index[sl]], target=None if targets is None else targets[sl],
                                batch_size=batch_size, progress=False)
            ok = result.success
            tried += len(ok)
            found += int(ok.sum())
            kept_x.append(result.x_adv[ok])
            kept_i.append(index[sl][ok])
            kept_t.append((result.pred if targets is None else targets[sl])[ok])
            l2.append(result.l2[ok])
            linf.append(result.linf[ok])
    n = min(found, wanted)
    x_kept = torch.cat(kept_x)[:n] if kept_x else torch.zeros((0, *x.shape[1:]))
    l2_kept = torch.cat(l2)[:n] if l2 else torch.zeros(0)
    linf_kept = torch.cat(linf)[:n] if linf else torch.zeros(0)
    summary = {"success_rate": found / tried if tried else float("nan"), "n": n, "n_tried": tried,
               "mean_l2": float(l2_kept.mean()) if n else float("nan"),
               "mean_linf": float(linf_kept.mean()) if n else float("nan")}
    empty = torch.zeros(0, dtype=torch.long)
    return Crafted(x_kept, torch.cat(kept_i)[:n] if kept_i else empty, torch.cat(kept_t)[:n] if kept_t else empty,
                   summary)
