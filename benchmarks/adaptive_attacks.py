"""Adaptive attacks on MNIST: how often an attacker who knows the guard both fools the model and passes the guard.

Run by hand from the repository root (not in CI; at the default --n 50 about 6 CPU-minutes per seed on one
thread; seeds can run as separate processes, one --seeds each, then once more with all seeds to report):

    python benchmarks/adaptive_attacks.py --seeds 0 1 --n 50 --out benchmarks/results/adaptive_attacks.md

Per seed: the study's clean mnist_cnn (benchmarks/adaptive_model.py, cached under malex-out/adaptive/); the
default guard (5% FPR) fitted on the first 3,000 clean validation inputs, and beside it one guard per member
(the member alone, calibrated the same way, on the same inputs); `--n` correctly classified test inputs (a seeded
draw) as sources. For eps 0.15, 0.3 and 0.6 it runs plain PGD (the study's recipe scaled with eps: 40 steps of
eps/30) and, against each target (the guard and each member alone), `adaptive_pgd` and `orthogonal_pgd` (their
defaults: 100 steps from eps/10 down a cosine to eps/1000) given that target's `GuardEvidence`. "Attacker
success" is the share of sources whose adversarial example fools the model AND passes the target at its
calibrated threshold. Against the guard also: CW-L2 plain and adaptive (`adaptive_cw`), and feature matching
(`feature_matching`, guided by the guard's clean fit inputs) at each eps.

Sanity checks (per seed): against no detector `adaptive_pgd` with the CE loss is plain PGD (identical examples)
and with its default margin loss fools the model as often; attacker success against the guard grows with eps; an
unbounded attack (eps 1) against the guard; each surrogate's Spearman correlation with the real score on clean and
plain-PGD (eps 0.3) inputs; `torch.autograd.gradcheck` of the guard's evidence and of every member's surrogate in
float64 at one input moved to a generic interior point (0.05 + 0.9 x + small noise). Per-seed results are kept
as JSON in malex-out/adaptive/ (a rerun reuses them; --fresh recomputes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from malex.attacks.adversarial import make_adversarial
from malex.data import load_dataset
from malex.guard import Guard, GuardConfig
from malex.guard.adaptive import outcome, plain_pgd, targets as aim_targets
from malex.guard.surrogate import GuardEvidence, gradient_check, rank_agreement
from malex.models.inference import predict
from malex.progress import track

from adaptive_model import CACHE, cached_model  # benchmarks/ is on sys.path when run as a script

EPSILONS = (0.15, 0.3, 0.6)
ADAPTIVE = ("adaptive_pgd", "orthogonal_pgd")
N_FIT = 3000  # as many as the study's fit and calibration pools together (the guard splits them 60/40)


def run_seed(seed: int, n: int) -> dict:
    """Every measurement of one seed, as plain data."""
    torch.manual_seed(seed)
    data = load_dataset("mnist", seed=seed)
    model, accuracy = cached_model(data, seed)
    fit_x, fit_y = data.val.x[:N_FIT], data.val.y[:N_FIT]
    guard = Guard(model, GuardConfig(seed=seed, progress=False)).fit(fit_x, fit_y)
    members = list(guard.detectors)
    targets = aim_targets(guard, ["guard", *members])
    evidence = {name: GuardEvidence(t) for name, t in targets.items()}

    order = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(seed))
    correct = order[predict(model, data.test.x[order]) == data.test.y[order]][:n]
    x, y = data.test.x[correct], data.test.y[correct]
    out: dict = {"seed": seed, "clean_accuracy": accuracy, "n": int(len(x)), "members": members,
                 "threshold": guard.threshold_.value,
                 "clean_flagged": {k: float(t.screen(x).flagged.mean()) for k, t in targets.items()},
                 "plain": {}, "adaptive": {}, "cross": {}}

    cells = [(eps, attack, target) for eps in EPSILONS for attack in ADAPTIVE for target in targets]
    plain = {}
    for eps in EPSILONS:
        plain[eps] = plain_pgd(eps).run(model, x, y, progress=False)
        out["plain"][str(eps)] = {k: outcome(t, plain[eps]) for k, t in targets.items()}
    for eps, attack, target in track(cells, f"seed {seed}: adaptive attacks"):
        result = make_adversarial(attack, eps=eps).against(evidence[target]).run(model, x, y, progress=False)
        out["adaptive"].setdefault(str(eps), {}).setdefault(attack, {})[target] = outcome(targets[target], result)
        if target != "guard":  # an attack aimed at one member, screened by the whole guard
            out["cross"].setdefault(str(eps), {}).setdefault(attack, {})[target] = outcome(guard, result)

    # --- the other families, against the guard: CW-L2 plain and adaptive, feature matching ---
    cw = {"steps": 100, "lr": 0.05, "binary_search_steps": 3, "c": 0.1}  # the study's CW, 3 binary-search steps
    out["cw"] = {"cw": outcome(guard, make_adversarial("cw", **cw).run(model, x, y, progress=False)),
                 "adaptive_cw": outcome(guard, make_adversarial("adaptive_cw", **cw).against(evidence["guard"]).run(
                     model, x, y, progress=False))}
    out["feature_matching"] = {str(eps): outcome(guard, make_adversarial("feature_matching", eps=eps).toward(
        fit_x, fit_y).run(model, x, y, progress=False)) for eps in EPSILONS}

    # --- sanity checks ---
    sanity: dict = {}
    eps = 0.3
    same = make_adversarial("adaptive_pgd", eps=eps, alpha=eps / 30, steps=40, loss="ce", step_decay=False).run(
        model, x, y, progress=False)
    margin_only = make_adversarial("adaptive_pgd", eps=eps).run(model, x, y, progress=False)
    sanity["undefended"] = {"pgd": plain[eps].success_rate, "adaptive_ce": same.success_rate,
                            "adaptive_ce_identical": bool(torch.equal(same.x_adv, plain[eps].x_adv)),
                            "adaptive_margin": margin_only.success_rate}
    unbounded = make_adversarial("adaptive_pgd", eps=1.0).against(evidence["guard"]).run(model, x, y, progress=False)
    sanity["unbounded"] = {attack: outcome(guard, r) for attack, r in (
        ("adaptive_pgd", unbounded),
        ("orthogonal_pgd", make_adversarial("orthogonal_pgd", eps=1.0).against(evidence["guard"]).run(
            model, x, y, progress=False)))}
    sanity["rank_agreement"] = rank_agreement(evidence["guard"], torch.cat([x, plain[eps].x_adv]))
    # at a generic interior point: MNIST's many exact zeros tie inside max-pooling windows, where the MODEL has no
    # derivative (a finite difference there checks nothing about the surrogate)
    noise = torch.randn(x[:1].shape, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    sanity["gradcheck"] = gradient_check(guard, (0.05 + 0.9 * x[:1] + 0.02 * noise).clamp(0.01, 0.99))
    sanity["gradcheck_seconds"] = time.perf_counter() - start
    out["sanity"] = sanity
    return out


def mean_std(values: list[float]) -> str:
    """'m ± s' over seeds (just m for one seed), as percentages."""
    v = np.asarray(values, dtype=np.float64) * 100
    return f"{v.mean():.1f}" if v.size == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def report(runs: list[dict], command: str) -> str:
    """The markdown report of the per-seed results."""
    seeds = [r["seed"] for r in runs]
    targets = ["guard"] + runs[0]["members"]
    accuracies = ", ".join(f"{r['clean_accuracy']:.4f}" for r in runs)
    lines = [
        "# Adaptive attacks on MNIST: attacker success against the guard and each member",
        "",
        f"Command: `{command}`",
        "",
        f"Seeds {seeds}; per seed {runs[0]['n']} correctly classified test sources; the study's mnist_cnn (clean test "
        f"accuracy {accuracies}); every target (the default guard, and each member alone as a one-detector guard) "
        f"fitted on {N_FIT} clean validation inputs at 5% FPR. Cells are percent, mean ± std over seeds. "
        "**Attacker success** = fools the model AND passes the target at its calibrated threshold. Plain PGD: 40 "
        "steps of eps/30; adaptive_pgd / orthogonal_pgd: 100 steps from eps/10 down a cosine to eps/1000, weight 0.1, "
        "evidence margin 2, against the target's differentiable surrogate (`malex.guard.surrogate.GuardEvidence`, "
        "20 mutants per mutation detector).",
        "",
        "## Attacker success (%)",
        "",
        "| target | " + " | ".join(f"eps {e}: PGD | adaptive | orthogonal" for e in EPSILONS) + " |",
        "|---|" + "---|---|---|" * len(EPSILONS),
    ]
    for t in targets:
        cells = []
        for e in EPSILONS:
            cells.append(mean_std([r["plain"][str(e)][t]["attacker_success"] for r in runs]))
            cells += [mean_std([r["adaptive"][str(e)][a][t]["attacker_success"] for r in runs]) for a in ADAPTIVE]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "Clean sources flagged (%, the targets' false-positive rate on them): "
              + ", ".join(f"{t} {mean_std([r['clean_flagged'][t] for r in runs])}" for t in targets) + ".", "",
              "## Model fooled (%) and flagged by the target (%)", "",
              "| target | attack | " + " | ".join(f"eps {e}: fooled | flagged" for e in EPSILONS) + " |",
              "|---|---|" + "---|---|" * len(EPSILONS)]
    for t in targets:
        for a in ("pgd",) + ADAPTIVE:
            cells = []
            for e in EPSILONS:
                cell = [r["plain"][str(e)][t] if a == "pgd" else r["adaptive"][str(e)][a][t] for r in runs]
                cells += [mean_std([c["fooled"] for c in cell]), mean_std([c["flagged"] for c in cell])]
            lines.append(f"| {t} | {a} | " + " | ".join(cells) + " |")
    lines += ["", "## An attack aimed at one member, screened by the whole guard: attacker success (%)", "",
              "| aimed at | " + " | ".join(f"eps {e}: adaptive | orthogonal" for e in EPSILONS) + " |",
              "|---|" + "---|---|" * len(EPSILONS)]
    for t in runs[0]["members"]:
        cells = [mean_std([r["cross"][str(e)][a][t]["attacker_success"] for r in runs]) for e in EPSILONS
                 for a in ADAPTIVE]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Other families against the guard: CW-L2 (untargeted, 3 x 100 Adam steps from c 0.1) and feature "
              "matching (100 steps, guides: the guard's clean fit inputs)", "",
              "| attack | fooled % | flagged % | attacker success % | mean L2 (fooled) | mean Linf (fooled) |",
              "|---|---|---|---|---|---|"]
    rows = [(a, [r["cw"][a] for r in runs]) for a in ("cw", "adaptive_cw")]
    rows += [(f"feature_matching eps {e}", [r["feature_matching"][str(e)] for r in runs]) for e in EPSILONS]
    for label, cell in rows:
        rates = " | ".join(mean_std([c[k] for c in cell]) for k in ("fooled", "flagged", "attacker_success"))
        norms = " | ".join(f"{np.nanmean([c[k] for c in cell]):.2f}" for k in ("mean_l2", "mean_linf"))
        lines.append(f"| {label} | {rates} | {norms} |")
    lines += ["", "## Sanity checks", "",
              "| seed | undefended (eps 0.3): PGD / adaptive CE / identical / adaptive margin, fooled % | "
              "guard attacker success grows with eps (adaptive, orthogonal) | unbounded (eps 1) vs guard: adaptive, "
              "orthogonal % | Spearman surrogate vs real (clean + PGD) | gradcheck float64 |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        s = r["sanity"]
        u = s["undefended"]
        grows = []
        for a in ADAPTIVE:
            v = [r["adaptive"][str(e)][a]["guard"]["attacker_success"] for e in EPSILONS]
            grows.append("yes" if all(b >= a_ for a_, b in zip(v, v[1:])) else "NO")
        unb = ", ".join(f"{100 * s['unbounded'][a]['attacker_success']:.1f}" for a in ADAPTIVE)
        rho = ", ".join(f"{k} {v:.3f}" for k, v in s["rank_agreement"].items())
        grad = ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in s["gradcheck"].items())
        lines.append(f"| {r['seed']} | {100 * u['pgd']:.1f} / {100 * u['adaptive_ce']:.1f} / "
                     f"{'yes' if u['adaptive_ce_identical'] else 'NO'} / {100 * u['adaptive_margin']:.1f} | "
                     f"{', '.join(grows)} | {unb} | {rho} | {grad} |")
    secs = [c["seconds"] for r in runs for e in EPSILONS for a in ADAPTIVE for c in [r["adaptive"][str(e)][a]["guard"]]]
    lines += ["", f"Wall time of one adaptive run against the guard on {runs[0]['n']} sources (one thread): "
              f"median {np.median(secs):.0f} s.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n", type=int, default=50, help="correctly classified test sources per seed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptive_attacks.md"))
    p.add_argument("--fresh", action="store_true", help="recompute seeds whose results are cached")
    args = p.parse_args()
    torch.set_num_threads(1)
    runs = []
    for seed in args.seeds:
        path = CACHE / f"results-seed{seed}-n{args.n}.json"
        if path.is_file() and not args.fresh:
            runs.append(json.loads(path.read_text()))
            continue
        result = run_seed(seed, args.n)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        runs.append(result)
    command = "python benchmarks/adaptive_attacks.py " + shlex.join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(runs, command))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
