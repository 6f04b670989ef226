"""The guard's typing on a study's cached cells: the evidence rule against the learned typing, nothing refitted
but the typing.

For every model of every finished cell in a study folder, the study's fitted guard (its cached guard file) is
loaded and screens, per cell, the mixed stream of the model's clean test inputs and the cell's malicious inputs
(both from the cache): 'before' is the evidence rule. Then the same guard fits a learned typing on its own fit
inputs (`Guard.fit_typing`: PGD it crafts at eps 0.05 / 0.1 / 0.3 x 10 steps and universal triggers it
optimises; never the study's attack settings) and screens the same streams: 'after' (a guard that found no
universal trigger keeps the evidence rule), and 'after, no trigger: adversarial' (such a guard calls every
flagged input adversarial: `StandInConfig.no_trigger`), and 'search only' (the trigger search decides whether the
model shows a sign of a backdoor: none, flagged inputs are adversarial; one, the evidence rule types them). Detection is identical;
only the typing differs. Reports per cell the three-way accuracy and the malicious inputs typed right, mean ±
std over seeds, and the typing's fit time.

    python benchmarks/guard_typing_study.py malex-out/study-mnist --out benchmarks/results/guard_typing_mnist.md
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from malex.evaluate.study import open_study
from malex.evaluate.study.seed import SeedRun
from malex.guard import BENIGN, Guard
from malex.guard.guard import fit_calibration_split
from malex.progress import track
from malex.report import aggregate


#: what is measured: the evidence rule, the learned typing, and two ways of deciding from the same fit
WHENS = ("before", "after", "after, no trigger: adversarial", "search only")
VARIANTS = {"after, no trigger: adversarial": {"no_trigger": "adversarial"},
            "search only": {"no_trigger": "adversarial", "with_trigger": "evidence"}}


def mixed(guard: Guard, clean_verdict: list[str], x: torch.Tensor, kind: str) -> tuple[float, float]:
    """(three-way accuracy of clean + malicious, share of malicious inputs typed right)."""
    verdict = guard.screen(x).verdict
    right = sum(v == kind for v in verdict)
    clean_right = sum(v == BENIGN for v in clean_verdict)
    return (clean_right + right) / (len(clean_verdict) + len(verdict)), right / max(len(verdict), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a finished (or partly finished) study folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guard_typing_study.md"))
    parser.add_argument("--model", action="append", default=None,
                        help="only this model key's cells (repeatable; e.g. clean, badnets); default every model")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    study = open_study(args.study)
    done, _ = study.results()
    by_model: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for cell in done:
        if cell["rows"] and (args.model is None or cell["model"] in args.model):
            by_model[(cell["dataset"], cell["seed"], cell["model"])].append(cell)
    results: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    costs, learned = [], []
    for (dataset, seed, key), cells in track(list(by_model.items()), "typing per model"):
        ds = study.config.dataset(dataset)
        run = SeedRun(study.ctx, ds, seed)
        model, _ = run.model(key)
        guard = Guard.load(study.layout.guard(dataset, seed, key), model)
        clean = run.clean_test(key)
        sets = {c["attack"]: (run.attack(ds.attack(c["attack"]))[0], c["kind"]) for c in cells}
        for when in WHENS:
            if when in VARIANTS:  # the same fitted typing, decided otherwise
                guard.config = dataclasses.replace(guard.config, typing_settings={
                    **guard.config.typing_settings, **VARIANTS[when]})
            if when == "after":
                pools = run.pools
                x = torch.cat([pools.fit.x, pools.calibration.x])
                y = torch.cat([pools.fit.y, pools.calibration.y])
                groups = None if pools.fit.groups is None else torch.cat([pools.fit.groups, pools.calibration.groups])
                cfg = guard.config
                fit_idx, _ = fit_calibration_split(y, groups, cfg.calibration_fraction, cfg.max_fit, cfg.seed)
                guard.fit_typing(x[fit_idx])
                costs.append(guard.typing_seconds_)
                learned.append(guard.kind_model_ is not None)
            clean_verdict = guard.screen(clean).verdict
            for attack, (mal, kind) in sets.items():
                acc, typed = mixed(guard, clean_verdict, mal, kind)
                results[(dataset, attack, kind)][f"{when}_acc"].append(acc)
                results[(dataset, attack, kind)][f"{when}_typed"].append(typed)
                print(f"{dataset} seed {seed} {key} model, {attack}: {when} three-way {acc:.3f}, typed right "
                      f"{typed:.3f}" + (f" (typing fit {costs[-1]:.0f} s, learned {learned[-1]})" if when != "before"
                                        else ""), file=sys.stderr, flush=True)
    fmt = lambda v: aggregate.fmt(*aggregate.mean_std(v))  # noqa: E731
    whens, titles = WHENS, ("evidence", "learned", "learned, no trigger: adversarial",
                            "trigger search only (no trigger: adversarial, else evidence)")
    header = (["dataset", "attack", "seeds"] + [f"three-way acc. ({t})" for t in titles]
              + [f"typed right ({t})" for t in titles])
    body = [[d, f"{a} ({k})", str(len(r["before_acc"]))] + [fmt(r[f"{w}_acc"]) for w in whens]
            + [fmt(r[f"{w}_typed"]) for w in whens] for (d, a, k), r in results.items()]
    text = "\n\n".join([
        "# The guard's typing on a study's cells: evidence rule vs learned typing",
        f"`python {shlex.join(['benchmarks/guard_typing_study.py'] + argv)}` on {len(done)} finished cells of "
        f"{args.study}. Mixed stream per cell: the model's clean test inputs + the cell's malicious inputs; "
        "'typed right': malicious inputs flagged and called their kind. Mean ± sample std over seeds.",
        aggregate.markdown_table(header, body),
        f"Learned typing fit: {fmt(costs)} s per model (one thread, shared machine); a learned model in "
        f"{sum(learned)} of {len(learned)} models (else no universal trigger worked like a planted one and the "
        "evidence rule stayed).",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    raise SystemExit(code)
