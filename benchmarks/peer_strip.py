"""malex's STRIP detector against ART's STRIP (`art.defences.transformer.poisoning.STRIP`) on a BadNets model.

Run by hand from the repository root in the main venv (needs the `bench` extra, i.e.
adversarial-robustness-toolbox):

    python benchmarks/peer_strip.py --seed 0

What ART 1.20 does (art/estimators/poison_mitigation/strip/strip.py, `STRIPMixin`): for each input it draws
`num_samples` overlay indices with `np.random.choice` (with replacement) from the clean `validation_data`,
blends with `combine_images(img, overlay)` = 0.5 * img + 0.5 * overlay, runs the classifier's `predict` on
the blends (an (n, classes) array; ART's PyTorchClassifier returns the module's raw outputs, so the module
must end in a softmax) and takes

    H_ART = sum(scipy.stats.entropy(P, base=2, axis=0)) / n,   P = predictions, shape (n, classes).

`axis=0` normalises each CLASS column over the n blends and takes the entropy of that column, so H_ART is
(1/n) sum_c H_2(P[:, c] / sum_i P[i, c]); the STRIP paper's (and malex's) quantity is the mean over blends
of each blend's entropy over classes, (1/n) sum_i H(P[i, :]), i.e. `axis=1`. Inputs with H_ART at or below a
threshold (fitted by `mitigate` as the `false_acceptance_rate` quantile of a normal fitted to clean
entropies) are abstained on. The blend is the same as malex's (alpha 0.5); the base differs (bits vs nats).

Both detectors are given the same clean overlay set: malex's `Strip` chooses `n_overlays` validation images
at fit time; ART's own `predict` loop is then run with `validation_data` = those images and its index draw
fixed to "every overlay, in order" (the module's `np.random.choice` is replaced for the call), and the
array ART passes to `scipy.stats.entropy` is recorded. From that same array the script computes ART's
value (axis 0, base 2) and the per-blend entropies (axis 1, base 2 and base e). ART is also run as shipped
(random per-input draws, its default 20 samples, `mitigate` on the clean validation split) for AUROC,
abstention rates and wall time. The table is printed and written as Markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import math
import os
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # ART's mitigate shows a per-input progress bar

import numpy as np
import scipy.stats
import torch
from rich.console import Console
from scipy.stats import spearmanr
from torch import nn

from malex.attacks.backdoor import attack_success_rate, make_trigger, triggered_inputs
from malex.data import load_digits
from malex.detectors.strip import Strip, StripConfig
from malex.metrics import auroc
from malex.models import Classifier
from malex.models.inference import accuracy, predict
from malex.probe import Probe
from malex.report.table import rows_table
from peer_model import ARCH, add_model_args, poisoned_model

EXPLANATION = """\
With P the (n, C) softmax outputs of the n blends of one input, the STRIP paper (Gao et al., Eq. 3-4)
and malex use the mean over blends of each blend's entropy over classes,
H = -(1/n) sum_i sum_c P[i, c] log P[i, c] (the paper in bits, malex in nats: H_malex = ln 2 * H_bits).
ART 1.20 calls `scipy.stats.entropy(P, base=2, axis=0)`: scipy normalises along axis 0, so for each class c
it takes q_i = P[i, c] / sum_j P[j, c] and returns H_2(q), the entropy of how class c's probability is
spread OVER THE BLENDS; ART then sums over classes and divides by n. A trojaned input whose n blends all
give the target probability ~1 yields log2(n) for the target column and, for the other columns, the spread
of tiny probabilities over the blends, which can be as uneven or even as for a clean input. The quantity
is bounded by C log2(n) / n and does not measure per-blend confidence, so it is not a monotone function of
the paper's entropy (the Spearman and AUROC rows show how far apart they are here). `axis=1` gives the paper's
value. ART's threshold is fitted on the same axis-0 values, so its abstention is consistent with its own
score but inherits the weaker separation.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--n-overlays", type=int, default=32, help="overlays per input in the aligned comparison")
    p.add_argument("--art-samples", type=int, default=20, help="ART num_samples when run as shipped (its default)")
    p.add_argument("--far", type=float, default=0.01, help="ART false_acceptance_rate when run as shipped")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/peer_strip.md"))
    return p.parse_args(argv)


class _FixedChoice:
    """Stands in for `numpy.random` inside ART's STRIP module: `choice(arange(k), n)` returns every overlay in
    order (checked), everything else is numpy's."""

    def choice(self, a, size=None, *rest, **kw):
        a = np.asarray(a)
        if size != len(a) or rest or kw or not np.array_equal(a, np.arange(len(a))):
            raise AssertionError(f"unexpected draw choice({a.shape}, {size}); expected num_samples == overlays")
        return a.copy()

    def __getattr__(self, name):
        return getattr(np.random, name)


class _NumpyProxy:
    def __init__(self) -> None:
        self.random = _FixedChoice()

    def __getattr__(self, name):
        return getattr(np, name)


@contextmanager
def art_hooks(fixed_overlays: bool, record_blends: bool = False):
    """Record what ART's STRIP passes to `scipy.stats.entropy` (and what it returns) and, if asked, the blends
    `combine_images` returns; optionally fix its overlay draw. Only names inside ART's STRIP module are
    swapped, and restored afterwards."""
    # (`import a.b.strip.strip as m` does not work here: the package's `strip` attribute is re-bound on import)
    strip_module = importlib.import_module("art.estimators.poison_mitigation.strip.strip")

    records: list[tuple[np.ndarray, np.ndarray]] = []
    blends: list[np.ndarray] = []
    original = strip_module.entropy, strip_module.np, strip_module.combine_images

    def recording_entropy(pk, *a, **kw):
        out = original[0](pk, *a, **kw)
        records.append((pk, out))
        return out

    def recording_combine(img1, img2, *a, **kw):
        out = original[2](img1, img2, *a, **kw)
        blends.append(out)
        return out

    strip_module.entropy = recording_entropy
    if fixed_overlays:
        strip_module.np = _NumpyProxy()
    if record_blends:
        strip_module.combine_images = recording_combine
    try:
        yield records, blends
    finally:
        strip_module.entropy, strip_module.np, strip_module.combine_images = original


def art_classifier(model: Classifier):
    """ART's PyTorchClassifier over model + softmax (ART's STRIP takes entropies of `predict`'s output)."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=nn.Sequential(model, nn.Softmax(dim=1)).eval(), loss=nn.CrossEntropyLoss(),
                             input_shape=tuple(model.input_shape), nb_classes=model.num_classes,
                             clip_values=(0.0, 1.0), device_type="cpu")


def conventions(records, n: int) -> dict[str, np.ndarray]:
    """Per input, from the very prediction arrays ART used: ART's value and the per-blend mean entropies."""
    art_value = np.array([np.sum(out) / float(n) for _, out in records])  # ART's own expression
    per_blend_bits = np.array([np.sum(scipy.stats.entropy(pk, base=2, axis=1)) / float(n) for pk, _ in records])
    per_blend_nats = np.array([np.sum(scipy.stats.entropy(pk, axis=1)) / float(n) for pk, _ in records])
    return {"art": art_value, "bits": per_blend_bits, "nats": per_blend_nats}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console() if sys.stdout.isatty() else Console(width=170)
    import art
    from art.defences.transformer.poisoning import STRIP

    data = load_digits(args.seed)
    model, origin = poisoned_model(data, args)
    trigger = make_trigger("badnets", size=args.trigger_size, margin=0)
    stamped = triggered_inputs(data.test, trigger, args.target).x
    stamped = stamped[predict(model, stamped) == args.target]  # successful backdoor inputs only
    x_all = torch.cat([data.test.x, stamped])
    n_clean = len(data.test.x)
    k = args.n_overlays

    probe = Probe(model, [])  # STRIP reads only the inputs
    val_obs, all_obs = probe.run(data.val.x), probe.run(x_all)

    # --- malex -------------------------------------------------------------------------------------------
    start = time.perf_counter()
    strip = Strip(model, StripConfig(n_overlays=k, alpha=0.5, seed=args.seed)).fit(val_obs)
    t_fit_malex = time.perf_counter() - start
    strip.score(all_obs.subset(slice(0, 8)))  # warm-up
    start = time.perf_counter()
    s_malex = strip.score(all_obs)
    t_score_malex = time.perf_counter() - start

    # --- ART on malex's overlays (its predict loop, draw fixed to all overlays in order) ----------------
    aligned = STRIP(art_classifier(model))(num_samples=k)
    aligned.validation_data = strip.overlays_.numpy()
    aligned.entropy_threshold = -np.inf  # "mitigated", so predict runs the STRIP loop; abstains on nothing
    x_np = x_all.numpy()
    with art_hooks(fixed_overlays=True) as (records, _):
        start = time.perf_counter()
        aligned.predict(x_np)
        t_score_aligned = time.perf_counter() - start
    assert len(records) == len(x_np)
    conv = conventions(records, k)
    # the blends ART builds, against the formula in malex's Strip (alpha * x + (1 - alpha) * overlay), on a few inputs
    check = x_np[:: max(1, len(x_np) // 20)]
    with art_hooks(fixed_overlays=True, record_blends=True) as (_, art_blends):
        aligned.predict(check)
    art_blends = torch.from_numpy(np.stack(art_blends)).view(len(check), k, *x_all.shape[1:])
    ours = 0.5 * torch.from_numpy(check).unsqueeze(1) + 0.5 * strip.overlays_.unsqueeze(0)
    blend_diff = float((art_blends - ours).abs().max())

    # --- ART as shipped -------------------------------------------------------------------------------------
    shipped = STRIP(art_classifier(model))(num_samples=args.art_samples, false_acceptance_rate=args.far)
    np.random.seed(args.seed)
    start = time.perf_counter()
    shipped.mitigate(data.val.x.numpy())
    t_fit_shipped = time.perf_counter() - start
    with art_hooks(fixed_overlays=False) as (records_shipped, _):
        start = time.perf_counter()
        shipped_pred = shipped.predict(x_np)
        t_score_shipped = time.perf_counter() - start
    conv_shipped = conventions(records_shipped, args.art_samples)
    abstained = ~shipped_pred.any(axis=1)

    # --- comparison --------------------------------------------------------------------------------------
    ln2 = math.log(2.0)
    candidates = [  # (label, score oriented like malex's: higher = more suspicious)
        ("ART's per-blend entropy in nats, axis=1 (= malex's convention)", -conv["nats"]),
        ("ART's per-blend entropy in bits, axis=1, times ln 2", -conv["bits"] * ln2),
        ("ART's per-blend entropy in bits, axis=1 (paper's units, not rescaled)", -conv["bits"]),
        ("ART's value as implemented (axis=0, bits)", -conv["art"]),
    ]
    agree_rows = []
    for label, s in candidates:
        agree_rows.append([label, f"{np.abs(s_malex - s).max():.2e}", f"{spearmanr(s_malex, s).statistic:.6f}",
                           f"{auroc(s[:n_clean], s[n_clean:]):.6f}"])
    clean_sl, bd_sl = slice(0, n_clean), slice(n_clean, None)
    auroc_rows = [
        [f"malex Strip ({k} overlays)", f"{auroc(s_malex[clean_sl], s_malex[bd_sl]):.6f}"],
        [f"ART as implemented, malex's {k} overlays", f"{auroc(-conv['art'][clean_sl], -conv['art'][bd_sl]):.6f}"],
        [f"ART as shipped ({args.art_samples} random overlays per input)",
         f"{auroc(-conv_shipped['art'][clean_sl], -conv_shipped['art'][bd_sl]):.6f}"],
        ["ART's draws as shipped, per-blend entropy (axis=1)",
         f"{auroc(-conv_shipped['bits'][clean_sl], -conv_shipped['bits'][bd_sl]):.6f}"],
    ]
    range_rows = []
    for label, v in (("malex mean entropy (nats)", -s_malex), ("ART value as implemented (axis=0, bits)", conv["art"]),
                     ("per-blend mean entropy (axis=1, bits)", conv["bits"])):
        range_rows.append([label, f"{np.median(v[clean_sl]):.4f}", f"{np.median(v[bd_sl]):.4f}",
                           f"{v.min():.4f}", f"{v.max():.4f}"])
    time_rows = [
        [f"malex Strip ({k} overlays, batched)", f"{1e3 * t_fit_malex:.1f}", f"{t_score_malex:.3f}"],
        [f"ART STRIP predict loop on malex's {k} overlays", "(overlays given)", f"{t_score_aligned:.3f}"],
        [f"ART STRIP as shipped ({args.art_samples} overlays; fit = mitigate on {len(data.val.x)} clean)",
         f"{1e3 * t_fit_shipped:.1f}", f"{t_score_shipped:.3f}"],
    ]

    agree_headers = ["ART-side quantity (same overlays, same probabilities)", "max abs(malex score - it)",
                     "Spearman vs malex", "AUROC"]
    tables = [
        (f"Agreement with malex's score on {len(x_all)} inputs ({n_clean} clean test + {len(stamped)} BadNets)",
         agree_headers, agree_rows),
        ("AUROC, BadNets vs clean test (score = minus entropy)", ["detector", "AUROC"], auroc_rows),
        ("Entropy values", ["quantity", "median clean", "median BadNets", "min", "max"], range_rows),
        ("Wall time", ["implementation", "fit (ms)", f"score {len(x_all)} inputs (s)"], time_rows),
    ]
    for title, headers, body in tables:
        console.print(rows_table(title, headers, body))

    command = shlex.join(["python", "benchmarks/peer_strip.py", *(sys.argv[1:] if argv is None else argv)])
    setup = [
        f"model: {ARCH} on the embedded 8x8 digits (split seed {args.seed}), BadNets {args.trigger_size}x"
        f"{args.trigger_size} white square in the bottom-right corner (margin 0), target {args.target}, "
        f"{args.rate:.0%} of the training split poisoned, {origin}; clean test accuracy "
        f"{accuracy(model, data.test.x, data.test.y):.1%}, attack success rate "
        f"{attack_success_rate(model, data.test, trigger, args.target):.1%}",
        f"inputs: {n_clean} clean test inputs and {len(stamped)} BadNets-stamped non-target test inputs that the "
        "model sends to the target",
        f"malex: `Strip(model, StripConfig(n_overlays={k}, alpha=0.5, seed={args.seed}))` fitted on the clean "
        "validation split (it keeps {k} seeded validation images); score = minus the mean natural-log entropy "
        "of softmax over the blends alpha * x + (1 - alpha) * overlay".replace("{k}", str(k)),
        f"ART {art.__version__}: `STRIP(PyTorchClassifier(model + Softmax))(num_samples=...)`; blend "
        "`combine_images(img, overlay)` = 0.5 * img + 0.5 * overlay (the same as malex's); value "
        "sum(scipy.stats.entropy(P, base=2, axis=0)) / num_samples with P the (num_samples, classes) "
        "probabilities of the blends",
        f"aligned run: ART's own `predict` loop with validation_data = malex's {k} overlays, its per-input "
        "`np.random.choice` fixed to all overlays in order, entropy_threshold = -inf (nothing abstained); the "
        "array handed to scipy's entropy is recorded and every ART-side quantity is computed from it",
        f"as-shipped run: num_samples {args.art_samples}, false_acceptance_rate {args.far}, np.random.seed("
        f"{args.seed}), `mitigate(clean validation split)`; threshold {shipped.entropy_threshold:.4f} bits; "
        f"abstained on {abstained[clean_sl].mean():.1%} of clean test and {abstained[bd_sl].mean():.1%} of "
        "BadNets inputs",
        f"environment: Python {platform.python_version()}, torch {torch.__version__}, ART {art.__version__}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, {os.cpu_count()} CPU cores, "
        f"{torch.get_num_threads()} torch thread(s), CPU only; run {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]
    nats_diff = float(np.abs(s_malex + conv["nats"]).max())
    bits_diff = float(np.abs(s_malex + conv["bits"] * ln2).max())
    art_diff = float(np.abs(s_malex + conv["art"]).max())
    findings = [
        f"Blend: the same formula (ART `combine_images(img, overlay, alpha=0.5)` = 0.5 * img + 0.5 * overlay, no "
        f"clipping in either); ART's blends differ from 0.5 * x + 0.5 * overlay by at most {blend_diff:.1e} on "
        f"{len(check)} checked inputs x {k} overlays.",
        f"Per-blend entropy (STRIP paper, malex): malex's score equals minus ART's per-blend mean entropy in nats "
        f"to {nats_diff:.1e} (max abs), and minus ln 2 times it in bits to {bits_diff:.1e}: the base is the only "
        "convention difference in that quantity (malex = -ln 2 * bits).",
        f"ART's implemented value takes the entropy along axis 0 (over blends, per class) instead: it is not a "
        f"rescaling of malex's score (max abs difference {art_diff:.2f}, Spearman "
        f"{spearmanr(s_malex, -conv['art']).statistic:.3f}); AUROC "
        f"{auroc(-conv['art'][clean_sl], -conv['art'][bd_sl]):.3f} vs malex "
        f"{auroc(s_malex[clean_sl], s_malex[bd_sl]):.3f} on the same overlays and probabilities.",
        f"Wall time: malex scores {len(x_all)} inputs in {t_score_malex:.2f} s (batched); ART's per-input loop "
        f"takes {t_score_aligned:.2f} s with {k} overlays ({t_score_aligned / t_score_malex:.0f}x) and "
        f"{t_score_shipped:.2f} s as shipped with {args.art_samples}; ART's mitigate takes {t_fit_shipped:.2f} s.",
    ]
    for line in setup + findings:
        console.print("- " + line)

    def md_table(headers, body):
        out = ["| " + " | ".join(headers) + " |", "|---|" + "|".join(["---:"] * (len(headers) - 1)) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in body]

    md = ["# STRIP: malex vs ART", "", "Command (from the repository root, main venv):", "", "```", command, "```", "",
          "## Setup", "", *[f"- {s}" for s in setup], ""]
    for title, headers, body in tables:
        md += [f"## {title}", "", *md_table(headers, body), ""]
    md += ["## Computed from the tables", "", *[f"- {s}" for s in findings], "", "## What ART's value measures", "",
           EXPLANATION, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
