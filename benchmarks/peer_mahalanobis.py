"""malex's Mahalanobis detector against pytorch-ood's `Mahalanobis` on the same penultimate features.

pytorch-ood needs torchvision, which does not import beside the main venv's torch, so this benchmark runs in
a separate virtual environment outside the repository (from the repository root):

    python3 -m venv /tmp/oodvenv
    /tmp/oodvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/oodvenv/bin/pip install pytorch-ood
    /tmp/oodvenv/bin/pip install -e .
    /tmp/oodvenv/bin/python benchmarks/peer_mahalanobis.py --seed 0

A digits_cnn is trained on the digits with a BadNets trigger (2x2 white corner square, target 1, 10% of the
training inputs poisoned), or loaded from `cache/`. One probe pass captures the penultimate dense activation
"head.2" (256 units after ReLU) for the clean validation split (the fit set), the clean test split and the
BadNets-stamped test inputs that the model sends to the target. Both detectors are fitted on the SAME
validation features with the TRUE labels and score the SAME features:

* malex: `Mahalanobis.penultimate(model)` (one layer, no input pre-processing, ridge 0). Its raw layer score
  is min_c (f - mu_c)^T pinv(S / N) (f - mu_c), S the pooled within-class scatter, N the fit-set size; its
  detector score standardises that by cross-fitted clean statistics (a positive affine map).
* pytorch-ood: `Mahalanobis(encoder=None).fit_features(z, y)` / `.predict_features(z)`, which returns
  1/2 min_c (f - mu_c)^T inv(S + 1e-6 I) (f - mu_c). Its encoder path (`fit(loader)` / `predict(x)`) is
  run once with an encoder that returns the model's "head.2" output, to show it sees the same features.

Hence pytorch-ood = malex raw / (2 N) when 1e-6 is negligible against S and S has full rank. The script
checks that factor, the relative error after it, Spearman's rank correlation, AUROCs (BadNets vs clean test)
and wall times (median of --repeats). The table is printed and written as Markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from scipy.stats import spearmanr

from malex.attacks.backdoor import attack_success_rate, make_trigger, triggered_inputs
from malex.data import load_digits
from malex.detectors.mahalanobis import Mahalanobis
from malex.detectors.stats import penultimate_layer
from malex.metrics import auroc
from malex.models import Classifier
from malex.models.inference import accuracy, predict
from malex.probe import Probe
from malex.report.table import rows_table
from peer_model import ARCH, add_model_args, poisoned_model

LAYER = "head.2"
DERIVATION = """\
With S = sum_c sum_{i in c} (f_i - mu_c)(f_i - mu_c)^T the pooled within-class scatter of the N fit inputs
(both implementations compute the same class means mu_c and the same S from the same features and labels):

- malex: Sigma = S / N, raw score d2(f) = min_c (f - mu_c)^T pinv(Sigma) (f - mu_c) = N * min_c (f - mu_c)^T pinv(S) (f - mu_c).
- pytorch-ood: score(f) = -max_c(-1/2 (f - mu_c)^T inv(S + 1e-6 I) (f - mu_c)) = 1/2 min_c (f - mu_c)^T inv(S + 1e-6 I) (f - mu_c).

So score = d2 / (2N) exactly when (a) the 1e-6 ridge is negligible against the positive eigenvalues of S
and (b) every scored f - mu_c lies in the range of S, where inv(S + 1e-6 I) and pinv(S) agree. Here S is
rank-deficient because ReLU units that never fire on the fit set give zero rows and columns; such a unit
is also zero in every class mean, so (b) holds as long as no scored input switches such a unit on (the
Setup line counts those inputs). If one did, pytorch-ood would add about f_j^2 / (2e-6) for it while
malex's pseudo-inverse ignores that direction: the two scores would stop being proportional. The
remaining relative difference comes from pytorch-ood's float32 arithmetic (malex works in float64), and
the ridge's relative effect, 1e-6 / (smallest positive eigenvalue of S).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/peer_mahalanobis.md"))
    return p.parse_args(argv)


def timed(fn, repeats: int):
    """(last result, median wall seconds over `repeats` calls)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


class HiddenEncoder(torch.nn.Module):
    """The model up to and including "head.2" (the encoder handed to pytorch-ood's input path)."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.head[:3](m.features(m.normalize(x)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console() if sys.stdout.isatty() else Console(width=170)
    from pytorch_ood import __version__ as ood_version
    from pytorch_ood.detector import Mahalanobis as OODMahalanobis

    data = load_digits(args.seed)
    model, origin = poisoned_model(data, args)
    trigger = make_trigger("badnets", size=args.trigger_size, margin=0)
    stamped = triggered_inputs(data.test, trigger, args.target).x
    stamped = stamped[predict(model, stamped) == args.target]  # successful backdoor inputs only
    assert penultimate_layer(model) == LAYER

    probe = Probe(model, [LAYER])
    fit_obs, clean_obs, bd_obs = probe.run(data.val.x), probe.run(data.test.x), probe.run(stamped)
    z_fit, y_fit = fit_obs.layer(LAYER), data.val.y
    z_clean, z_bd = clean_obs.layer(LAYER), bd_obs.layer(LAYER)
    n_fit, dim = z_fit.shape

    # --- fit and score, both on the same features -----------------------------------------------------
    malex_det, t_fit_malex = timed(lambda: Mahalanobis.penultimate(model).fit(fit_obs, y_fit), args.repeats)
    _, t_fit_malex1 = timed(lambda: Mahalanobis.penultimate(model, folds=1).fit(fit_obs, y_fit), args.repeats)
    ood_det, t_fit_ood = timed(lambda: OODMahalanobis(None).fit_features(z_fit, y_fit), args.repeats)

    def malex_raw(obs):
        return malex_det.distances(obs, LAYER).min(dim=1).values.numpy()

    (raw_clean, raw_bd), t_score_malex_raw = timed(lambda: (malex_raw(clean_obs), malex_raw(bd_obs)), args.repeats)
    (std_clean, std_bd), t_score_malex = timed(lambda: (malex_det.score(clean_obs), malex_det.score(bd_obs)),
                                               args.repeats)
    (ood_clean, ood_bd), t_score_ood = timed(
        lambda: (ood_det.predict_features(z_clean).double().numpy(), ood_det.predict_features(z_bd).double().numpy()),
        args.repeats)

    # Attribution of the residual: pytorch-ood's own code again, with float64 as torch's default dtype (its
    # means, scatter and ridge are allocated with the default dtype) on float64 features.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ood64 = OODMahalanobis(None).fit_features(z_fit.double(), y_fit)
        ood64_all = torch.cat([ood64.predict_features(z_clean.double()), ood64.predict_features(z_bd.double())]).numpy()
    finally:
        torch.set_default_dtype(previous)

    # pytorch-ood's own input path with an encoder returning head.2: same features, same scores?
    encoder = HiddenEncoder(model).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.val.x, data.val.y), batch_size=256)
    ood_enc = OODMahalanobis(encoder).to("cpu").fit(loader)
    with torch.no_grad():
        enc_feature_diff = float((encoder(data.test.x) - z_clean).abs().max())
    enc_score_diff = float(np.abs(ood_enc.predict(data.test.x).double().numpy() - ood_clean).max())

    # --- relation -----------------------------------------------------------------------------------------
    factor = 1.0 / (2 * n_fit)
    rows = []
    for name, raw, std, ood in (("clean test", raw_clean, std_clean, ood_clean),
                                ("BadNets", raw_bd, std_bd, ood_bd),
                                ("both", np.r_[raw_clean, raw_bd], np.r_[std_clean, std_bd], np.r_[ood_clean, ood_bd])):
        ratio = ood / raw
        rel = np.abs(ood - factor * raw) / np.abs(factor * raw)
        rows.append({
            "set": name, "n": len(raw), "malex raw median": float(np.median(raw)), "ood median": float(np.median(ood)),
            "ratio min": float(ratio.min()), "ratio max": float(ratio.max()), "max rel diff": float(rel.max()),
            "spearman raw": float(spearmanr(raw, ood).statistic), "spearman det": float(spearmanr(std, ood).statistic),
        })
    raw_all = np.r_[raw_clean, raw_bd]
    rel64 = float((np.abs(ood64_all - factor * raw_all) / (factor * raw_all)).max())
    aurocs = {"malex raw layer distance": auroc(raw_clean, raw_bd),
              "malex detector score (standardised)": auroc(std_clean, std_bd),
              "pytorch-ood": auroc(ood_clean, ood_bd)}

    # --- diagnostics: conditioning of the scatter that both invert --------------------------------------
    scatter = malex_det.precision_[LAYER]  # pinv(S/N); its rank is S's rank
    rank = int(torch.linalg.matrix_rank(scatter, hermitian=True))
    dead_fit = (z_fit.abs().max(dim=0).values == 0)
    woken = {n: int(((z[:, dead_fit] != 0).any(dim=1)).sum()) for n, z in (("clean test", z_clean), ("BadNets", z_bd))}
    eig = torch.linalg.eigvalsh(torch.linalg.pinv(scatter, hermitian=True) * n_fit)  # eigenvalues of S
    eig_pos = eig[eig > eig.max() * 1e-12]

    # --- report ---------------------------------------------------------------------------------------
    rel_headers = ["set", "n", "malex raw d² (median)", "pytorch-ood (median)", "ood / raw min", "ood / raw max",
                   "max rel diff vs raw/(2N)", "Spearman (raw)", "Spearman (det score)"]
    rel_cells = [[r["set"], str(r["n"]), f"{r['malex raw median']:.4g}", f"{r['ood median']:.4g}",
                  f"{r['ratio min']:.6e}", f"{r['ratio max']:.6e}", f"{r['max rel diff']:.2e}",
                  f"{r['spearman raw']:.6f}", f"{r['spearman det']:.6f}"] for r in rows]
    time_headers = ["implementation", "fit (ms)", "score clean + BadNets (ms)"]
    time_cells = [
        ["malex Mahalanobis.penultimate (default: one layer, not cross-fitted)", f"{1e3 * t_fit_malex:.1f}",
         f"{1e3 * t_score_malex:.1f}"],
        ["malex Mahalanobis.penultimate (folds=1 set explicitly)", f"{1e3 * t_fit_malex1:.1f}", "(same as above)"],
        ["malex raw layer distance (`distances().min`)", "(same fit)", f"{1e3 * t_score_malex_raw:.1f}"],
        [f"pytorch-ood {ood_version} fit_features / predict_features", f"{1e3 * t_fit_ood:.1f}",
         f"{1e3 * t_score_ood:.1f}"],
    ]
    auroc_cells = [[k, f"{v:.6f}"] for k, v in aurocs.items()]

    for title, headers, body in (("Relation: pytorch-ood score vs malex raw squared distance", rel_headers, rel_cells),
                                 ("AUROC, BadNets vs clean test", ["score", "AUROC"], auroc_cells),
                                 (f"Wall time (median of {args.repeats}, {args.threads} torch thread(s))",
                                  time_headers, time_cells)):
        console.print(rows_table(title, headers, body))

    command = shlex.join(["/tmp/oodvenv/bin/python", "benchmarks/peer_mahalanobis.py",
                          *(sys.argv[1:] if argv is None else argv)])
    setup = [
        f"model: {ARCH} on the embedded 8x8 digits (split seed {args.seed}), BadNets {args.trigger_size}x"
        f"{args.trigger_size} white square in the bottom-right corner (margin 0), target {args.target}, "
        f"{args.rate:.0%} of the training split poisoned, {origin}; clean test accuracy "
        f"{accuracy(model, data.test.x, data.test.y):.1%}, attack success rate "
        f"{attack_success_rate(model, data.test, trigger, args.target):.1%}",
        f"features: layer {LAYER} (ReLU after the 256-unit dense layer), one malex probe pass; fit set = clean "
        f"validation split, N = {n_fit}, d = {dim}, true labels; scored: {len(z_clean)} clean test inputs and "
        f"{len(z_bd)} BadNets-stamped non-target test inputs that the model sends to the target",
        "malex: `Mahalanobis.penultimate(model)` (layers=('head.2',), noise_magnitude 0, ridge 0; one layer, so "
        "its score statistics are not cross-fitted); "
        "'raw' is `distances(obs, 'head.2').min(1)` = min_c (f-mu_c)^T pinv(S/N) (f-mu_c) in float64; "
        "'det score' is `score()` (raw standardised by the clean mean/std, a positive affine map)",
        f"pytorch-ood {ood_version}: `Mahalanobis(None).fit_features(z, y)` / `predict_features(z)` = "
        "1/2 min_c (f-mu_c)^T inv(S + 1e-6 I) (f-mu_c) in float32 (no input pre-processing: that is "
        "`MahalanobisODIN`)",
        f"pytorch-ood's encoder path (`fit(DataLoader)` / `predict(x)` with an encoder returning {LAYER}): "
        f"features differ from the probe's by at most {enc_feature_diff:.1e}, scores from `predict_features` "
        f"by at most {enc_score_diff:.1e}",
        f"scatter S of the fit set: rank {rank} of {dim}; {int(dead_fit.sum())} units are zero on every fit input, "
        f"and {woken['clean test']} clean test / {woken['BadNets']} BadNets inputs are non-zero on any of them; "
        f"positive eigenvalues of S from {float(eig_pos.min()):.3g} to {float(eig_pos.max()):.3g}",
        f"expected factor 1/(2N) = {factor:.6e}",
        f"residual check: pytorch-ood's same code run in float64 (torch default dtype float64, float64 features) "
        f"differs from malex raw/(2N) by at most {rel64:.1e} relative; the ridge alone accounts for up to "
        f"1e-6 / {float(eig_pos.min()):.3g} = {1e-6 / float(eig_pos.min()):.1e}",
        f"environment: Python {platform.python_version()}, torch {torch.__version__}, pytorch-ood {ood_version}, "
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), CPU only; "
        f"run {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]
    both = rows[-1]
    findings = [
        f"pytorch-ood / malex raw lies in [{both['ratio min']:.6e}, {both['ratio max']:.6e}] over all "
        f"{both['n']} scored inputs; expected 1/(2N) = {factor:.6e}. After dividing malex's raw distance by 2N the "
        f"largest relative difference is {both['max rel diff']:.1e}.",
        f"Spearman rank correlation with pytorch-ood: {both['spearman raw']:.6f} (malex raw), "
        f"{both['spearman det']:.6f} (malex detector score).",
        "AUROC (BadNets vs clean test): " + ", ".join(f"{k} {v:.6f}" for k, v in aurocs.items()) + ".",
        f"Wall time (features already captured): fit {1e3 * t_fit_malex:.1f} ms malex (default; "
        f"{1e3 * t_fit_malex1:.1f} ms with folds=1 set explicitly) vs {1e3 * t_fit_ood:.1f} ms pytorch-ood; score "
        f"{1e3 * t_score_malex:.1f} ms malex vs {1e3 * t_score_ood:.1f} ms pytorch-ood.",
    ]
    for line in setup + findings:
        console.print("- " + line)

    def md_table(headers, body, left=1):
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(headers) - left)) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in body]

    md = ["# Mahalanobis: malex vs pytorch-ood", "", "Command (from the repository root, in the benchmark venv):", "",
          "```", command, "```", "", "## Setup", "", *[f"- {s}" for s in setup], "",
          "## Relation: pytorch-ood score vs malex raw squared distance", "",
          *md_table(rel_headers, rel_cells), "", "## AUROC, BadNets vs clean test", "",
          *md_table(["score", "AUROC"], auroc_cells), "",
          f"## Wall time (median of {args.repeats} runs, features already captured)", "",
          *md_table(time_headers, time_cells), "", "## Computed from the tables", "",
          *[f"- {s}" for s in findings], "", "## Why the factor is 1/(2N)", "", DERIVATION, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
