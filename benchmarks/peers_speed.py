"""Speed of malex against peers on the study's MNIST model: ART's STRIP and CW-L2, pytorch-ood's Mahalanobis.

Run by hand from the repository root in the main venv (it needs ART, the `bench` extra), with pytorch-ood's
venv beside it (see benchmarks/peer_mahalanobis.py for how /tmp/oodvenv is made):

    python benchmarks/peers_speed.py

One run, one machine, the same torch thread count (`--threads`) for every implementation, the same inputs:

1. STRIP, on the study's BadNets MNIST model (4x4 white square, margin 1, target 1): malex `Strip` and ART's
   STRIP `predict` loop score the same N clean test inputs and N BadNets-stamped test inputs that the model
   sends to the target, with the same k overlays (ART's overlay draw fixed to malex's overlays, as in
   benchmarks/peer_strip.py). Agreement: malex's score against the per-blend entropy computed from the very
   probabilities ART used, and against ART's own (axis-0) value.
2. CW-L2, on the study's clean MNIST model: malex `CW` and ART's `CarliniL2Method` with identical settings (as
   in benchmarks/cw_vs_art.py) on the same N correctly classified test inputs: wall time, success rate, L2.
3. Mahalanobis, on the clean model's penultimate layer: malex `Mahalanobis.penultimate(model)` and
   pytorch-ood's `Mahalanobis` fitted on the same validation features with the true labels, scoring the same
   features (STRIP's clean and BadNets inputs and malex's CW adversarial examples). pytorch-ood needs
   torchvision, which does not import beside the main venv's torch, so this part runs as a subprocess of
   `--ood-python` (this script with `--worker`); the inputs travel as an .npz and the timings come back as
   JSON. Both detectors run in that subprocess, on its torch; malex is also timed in the main venv.

Cheap timings are the median of `--repeats` (after a warm-up call); the CW attacks run once each. The
summary table is printed and written as Markdown with the command, the environment and os.getloadavg(); a
`## Notes` section already in the output file is kept, so hand-written notes survive a re-run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from malex.detectors.mahalanobis import Mahalanobis
from malex.models import Classifier, load_model
from malex.models.inference import predict
from malex.probe import Observation, Probe
from peer_mahalanobis import HiddenEncoder, timed

STUDY = Path("malex-out/study-mnist-gtsrb/models/mnist/seed0")
NOTES = "## Notes"
HEADERS = ["peer", "task", "malex", "peer time", "peer / malex", "agreement"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clean-model", type=Path, default=STUDY / "clean.safetensors",
                   help="model for CW and Mahalanobis")
    p.add_argument("--backdoor-model", type=Path, default=STUDY / "badnets.safetensors", help="model for STRIP")
    p.add_argument("--seed", type=int, default=0, help="data split and input sample seed")
    p.add_argument("--parts", nargs="+", choices=("strip", "cw", "mahalanobis"),
                   default=["strip", "cw", "mahalanobis"], help="which comparisons to run")
    p.add_argument("--n", type=int, default=200, help="clean and BadNets inputs each, for STRIP and Mahalanobis")
    p.add_argument("--overlays", type=int, default=32, help="STRIP overlays per input (both)")
    p.add_argument("--strip-ref-batch", type=int, default=256,
                   help="also time malex Strip with this StripConfig.batch_size (blends per forward; 0: skip)")
    p.add_argument("--target", type=int, default=1, help="backdoor target class of the BadNets model")
    p.add_argument("--trigger-size", type=int, default=4, help="BadNets square side")
    p.add_argument("--trigger-margin", type=int, default=1, help="BadNets margin from the corner")
    p.add_argument("--fit-n", type=int, default=2000, help="clean validation inputs Mahalanobis is fitted on "
                                                           "(STRIP draws its overlays from them)")
    p.add_argument("--cw-n", type=int, default=50, help="correctly classified test inputs CW attacks")
    p.add_argument("--cw-steps", type=int, default=100, help="iterations per binary-search step (ART max_iter)")
    p.add_argument("--cw-binary-search-steps", type=int, default=5)
    p.add_argument("--cw-lr", type=float, default=0.01, help="learning rate (malex: Adam; ART: initial step)")
    p.add_argument("--cw-c", type=float, default=1.0, help="initial constant c")
    p.add_argument("--cw-also-lr", type=float, default=0.05,
                   help="also run malex CW at this learning rate, a reference row not matched with ART (0: skip)")
    p.add_argument("--cw-targeted", action="store_true", help="also run targeted CW (random other class)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, every implementation")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats for STRIP and Mahalanobis (median)")
    p.add_argument("--ood-python", type=Path, default=Path("/tmp/oodvenv/bin/python"),
                   help="python of the venv with pytorch-ood")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/peers_speed.md"))
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # .npz of inputs: Mahalanobis part
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)  # where the worker's JSON goes
    return p.parse_args(argv)


# --- small helpers ----------------------------------------------------------------------------------------

def warm_timed(fn: Callable[[], Any], repeats: int, warm_up: Callable[[], Any] | None = None) -> tuple[Any, float]:
    """`timed(fn, repeats)` after one call of `warm_up` (default: `fn` itself), so one-off costs stay out."""
    (warm_up or fn)()
    return timed(fn, repeats)


def fmt_time(seconds: float) -> str:
    """Seconds as '12.3 ms' or '4.56 s'."""
    return f"{1e3 * seconds:.1f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def loadavg() -> str:
    """os.getloadavg() as text."""
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def sample(idx: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` entries of `idx` in a seeded random order."""
    return idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))][:n]


# --- inputs -----------------------------------------------------------------------------------------------

def strip_inputs(model: Classifier, data, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """N clean test inputs and N BadNets-stamped non-target test inputs that `model` sends to the target."""
    from malex.attacks.backdoor import make_trigger

    trigger = make_trigger("badnets", size=args.trigger_size, margin=args.trigger_margin)
    x_clean = data.test.x[sample(torch.arange(len(data.test)), args.n, args.seed)]
    pool = sample(torch.nonzero(data.test.y != args.target).flatten(), 3 * args.n, args.seed + 1)
    stamped = trigger.apply(data.test.x[pool])
    stamped = stamped[predict(model, stamped) == args.target][: args.n]
    return x_clean, stamped


# --- 1. STRIP -----------------------------------------------------------------------------------------------

def strip_part(args: argparse.Namespace, data, console: Console) -> dict:
    """malex Strip vs ART's STRIP predict loop on the same inputs and overlays."""
    from art.defences.transformer.poisoning import STRIP
    from malex.detectors.strip import Strip, StripConfig
    from peer_strip import art_classifier, art_hooks, conventions

    model, _ = load_model(args.backdoor_model)
    model.eval()
    x_clean, x_bd = strip_inputs(model, data, args)
    x_all = torch.cat([x_clean, x_bd])
    k = args.overlays
    console.print(f"[bold]STRIP[/bold]: {len(x_clean)} clean + {len(x_bd)} BadNets inputs, {k} overlays ...")

    fit_obs = Observation(data.val.x[: args.fit_n], torch.empty(0))  # Strip reads only the inputs
    obs = Observation(x_all, torch.empty(0))
    strip = Strip(model, StripConfig(n_overlays=k, alpha=0.5, seed=args.seed)).fit(fit_obs)
    s_malex, t_malex = warm_timed(lambda: strip.score(obs), args.repeats, lambda: strip.score(obs.subset(slice(0, 8))))

    art_strip = STRIP(art_classifier(model))(num_samples=k)
    art_strip.validation_data = strip.overlays_.numpy()
    art_strip.entropy_threshold = -np.inf  # "mitigated": predict runs the STRIP loop and abstains on nothing
    x_np = x_all.numpy()
    records: list = []

    def run_art() -> None:
        with art_hooks(fixed_overlays=True) as (rec, _):
            art_strip.predict(x_np)
        records[:] = rec

    _, t_art = warm_timed(run_art, args.repeats, lambda: art_strip.predict(x_np[:8]))
    conv = conventions(records, k)
    ref = {}
    if args.strip_ref_batch > 0:  # the same detector and overlays, fewer blends per forward pass
        strip_ref = Strip(model, StripConfig(n_overlays=k, alpha=0.5, seed=args.seed,
                                             batch_size=args.strip_ref_batch)).fit(fit_obs)
        s_ref, t_ref = warm_timed(lambda: strip_ref.score(obs), args.repeats)
        ref = {"t_malex_ref": t_ref, "ref_max_abs": float(np.abs(s_ref - s_malex).max())}
    return {
        **ref, "n_clean": len(x_clean), "n_bd": len(x_bd), "k": k, "t_malex": t_malex, "t_art": t_art,
        "batch_size": strip.config.batch_size,
        "max_abs_nats": float(np.abs(s_malex + conv["nats"]).max()),
        "spearman_nats": spearman(s_malex, -conv["nats"]), "spearman_art": spearman(s_malex, -conv["art"]),
        "x_clean": x_clean, "x_bd": x_bd,
    }


# --- 2. CW-L2 -----------------------------------------------------------------------------------------------

def cw_part(args: argparse.Namespace, data, console: Console) -> dict:
    """malex CW vs ART's CarliniL2Method with identical settings on the same inputs (each run once)."""
    from cw_vs_art import paired_l2, pick_inputs, random_targets, run_art, run_malex, score, warm_up

    model, _ = load_model(args.clean_model)
    model.eval()
    x, y, _ = pick_inputs(model, data, args.cw_n, args.seed)
    settings = argparse.Namespace(c=args.cw_c, steps=args.cw_steps, lr=args.cw_lr,
                                  binary_search_steps=args.cw_binary_search_steps, batch_size=len(x), no_progress=True)
    warm_up(model, x)
    modes = [("untargeted", None)] + ([("targeted", random_targets(y, data.num_classes, args.seed))]
                                      if args.cw_targeted else [])
    out: dict = {"n": len(x), "modes": []}
    runs = [("malex", run_malex), ("ART", run_art)]
    if args.cw_also_lr > 0:
        runs.append(("malex, lr ref", partial(run_malex, lr=args.cw_also_lr)))
    for mode, target in modes:
        rows = []
        for impl, run in runs:
            console.print(f"[bold]CW-L2[/bold] {mode}, {impl}, {len(x)} inputs ...")
            x_adv, seconds = run(model, x, y, target, settings)
            rows.append(score(model, mode, impl, x, x_adv, y, target, seconds))
            if impl == "malex" and mode == "untargeted":
                out["x_adv"] = x_adv[rows[-1].success]
        ours, art = rows[:2]
        if len(rows) > 2:
            ref = rows[2]
            both = ref.success & art.success
            out.setdefault("ref", []).append({
                "mode": mode, "t_malex": ref.seconds, "t_art": art.seconds, "success_malex": ref.success_rate,
                "success_art": art.success_rate, "l2_malex": ref.mean_l2(), "l2_art": art.mean_l2(),
                "both": int(both.sum()), "l2_both_malex": ref.mean_l2(both), "l2_both_art": art.mean_l2(both)})
        out["modes"].append({
            "mode": mode, "t_malex": ours.seconds, "t_art": art.seconds,
            "success_malex": ours.success_rate, "success_art": art.success_rate,
            "l2_malex": ours.mean_l2(), "l2_art": art.mean_l2(),
            "both": int((ours.success & art.success).sum()),
            "l2_both_malex": paired_l2(rows, ours), "l2_both_art": paired_l2(rows, art),
        })
    return out


# --- 3. Mahalanobis -------------------------------------------------------------------------------------------

def time_malex_mahalanobis(model: Classifier, x_fit: torch.Tensor, y_fit: torch.Tensor, x_score: torch.Tensor,
                           repeats: int) -> dict:
    """Probe features, then malex's penultimate Mahalanobis: fit (folds 5 and 1) and score times, scores."""
    det = Mahalanobis.penultimate(model)
    layer = det.layers()[0]
    probe = Probe(model, [layer])
    fit_obs, score_obs = probe.run(x_fit), probe.run(x_score)
    det, t_fit = warm_timed(lambda: Mahalanobis.penultimate(model).fit(fit_obs, y_fit), repeats)
    _, t_fit1 = warm_timed(lambda: Mahalanobis.penultimate(model, folds=1).fit(fit_obs, y_fit), repeats)
    score, t_score = warm_timed(lambda: det.score(score_obs), repeats)
    raw, t_raw = warm_timed(lambda: det.distances(score_obs, layer).min(dim=1).values.numpy(), repeats)
    _, t_probe = warm_timed(lambda: probe.run(x_score), repeats)
    return {"layer": layer, "fit_obs": fit_obs, "score_obs": score_obs, "det": det, "score": score, "raw": raw,
            "t_fit": t_fit, "t_fit1": t_fit1, "t_score": t_score, "t_raw": t_raw, "t_probe_score": t_probe}


def mahalanobis_worker(args: argparse.Namespace) -> None:
    """Run in pytorch-ood's venv: both Mahalanobis detectors on the inputs in `--worker`, JSON to `--worker-out`."""
    torch.set_num_threads(args.threads)
    from pytorch_ood import __version__ as ood_version
    from pytorch_ood.detector import Mahalanobis as OODMahalanobis

    arrays = np.load(args.worker)
    x_fit, y_fit, x_score = (torch.from_numpy(arrays[k]) for k in ("x_fit", "y_fit", "x_score"))
    model, _ = load_model(args.clean_model)
    model.eval()
    m = time_malex_mahalanobis(model, x_fit, y_fit, x_score, args.repeats)
    z_fit, z_score = m["fit_obs"].layer(m["layer"]), m["score_obs"].layer(m["layer"])
    ood, t_fit = warm_timed(lambda: OODMahalanobis(None).fit_features(z_fit, y_fit), args.repeats)
    ood_score, t_score = warm_timed(lambda: ood.predict_features(z_score).double().numpy(), args.repeats)

    # from images: pytorch-ood's encoder path (forward to the layer + score) vs malex's probe pass + score
    encoder = HiddenEncoder(model).eval()
    ood_enc = OODMahalanobis(encoder).to("cpu").fit(
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_fit, y_fit), batch_size=256))
    enc_score, t_enc = warm_timed(lambda: ood_enc.predict(x_score).double().numpy(), args.repeats)

    n_fit = len(z_fit)
    factor = 1.0 / (2 * n_fit)
    dead = z_fit.abs().max(dim=0).values == 0
    result = {
        "torch": torch.__version__, "pytorch_ood": ood_version, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "loadavg": loadavg(), "layer": m["layer"], "n_fit": n_fit,
        "dim": int(z_fit.shape[1]), "n_score": len(z_score),
        "t_fit_malex": m["t_fit"], "t_fit1_malex": m["t_fit1"], "t_score_malex": m["t_score"],
        "t_raw_malex": m["t_raw"], "t_probe_score_malex": m["t_probe_score"],
        "t_fit_ood": t_fit, "t_score_ood": t_score, "t_encoder_score_ood": t_enc,
        "ratio_min": float((ood_score / m["raw"]).min()), "ratio_max": float((ood_score / m["raw"]).max()),
        "factor": factor, "max_rel": float((np.abs(ood_score - factor * m["raw"]) / (factor * m["raw"])).max()),
        "spearman_raw": spearman(m["raw"], ood_score), "spearman_det": spearman(m["score"], ood_score),
        "encoder_max_abs": float(np.abs(enc_score - ood_score).max()),
        "dead_units": int(dead.sum()), "woken": int((z_score[:, dead] != 0).any(dim=1).sum()),
    }
    args.worker_out.write_text(json.dumps(result))


def mahalanobis_part(args: argparse.Namespace, data, x_score: torch.Tensor, console: Console) -> dict:
    """The worker's results (pytorch-ood's venv), plus malex timed here in the main venv for reference."""
    console.print(f"[bold]Mahalanobis[/bold]: fit {args.fit_n}, score {len(x_score)}; worker in {args.ood_python} ...")
    x_fit, y_fit = data.val.x[: args.fit_n], data.val.y[: args.fit_n]
    with tempfile.TemporaryDirectory() as tmp:
        inputs, result = Path(tmp) / "inputs.npz", Path(tmp) / "result.json"
        np.savez(inputs, x_fit=x_fit.numpy(), y_fit=y_fit.numpy(), x_score=x_score.numpy())
        cmd = [str(args.ood_python), str(Path(__file__).resolve()), "--worker", str(inputs), "--worker-out",
               str(result), "--clean-model", str(args.clean_model), "--threads", str(args.threads),
               "--repeats", str(args.repeats)]
        subprocess.run(cmd, check=True)
        out = json.loads(result.read_text())
    model, _ = load_model(args.clean_model)
    model.eval()
    here = time_malex_mahalanobis(model, x_fit, y_fit, x_score, args.repeats)
    out.update({f"main_{k}": v for k, v in here.items() if k.startswith("t_")})
    return out


# --- report -----------------------------------------------------------------------------------------------

def summary_rows(res: dict, args: argparse.Namespace) -> list[list[str]]:
    """The summary table: one row per timed comparison."""
    rows = []

    def row(peer: str, task: str, t_malex: float, t_peer: float, agreement: str) -> None:
        rows.append([peer, task, fmt_time(t_malex), fmt_time(t_peer), f"{t_peer / t_malex:.2f}", agreement])

    if "strip" in res:
        s = res["strip"]
        row(f"ART {res['art_version']} STRIP", f"score {s['n_clean']} clean + {s['n_bd']} BadNets, {s['k']} overlays "
            "(same overlays)", s["t_malex"], s["t_art"],
            f"per-blend entropy: max abs diff {s['max_abs_nats']:.1e}, Spearman {s['spearman_nats']:.6f}; "
            f"ART's own axis-0 value: Spearman {s['spearman_art']:.3f}")
        if "t_malex_ref" in s:
            row(f"ART {res['art_version']} STRIP",
                f"the same, malex batch_size {args.strip_ref_batch} blends per forward (reference; default "
                f"{s['batch_size']})", s["t_malex_ref"], s["t_art"],
                f"scores equal to the default's within {s['ref_max_abs']:.1e}")
    if "cw" in res:
        c = res["cw"]
        for m, ref in [(m, False) for m in c["modes"]] + [(m, True) for m in c.get("ref", [])]:
            task = (f"CW-L2 {m['mode']}, {c['n']} inputs, {args.cw_binary_search_steps}x{args.cw_steps} iterations, "
                    + (f"malex lr {args.cw_also_lr} vs ART lr {args.cw_lr} (reference, not matched)" if ref
                       else f"lr {args.cw_lr}"))
            row(f"ART {res['art_version']} CarliniL2Method", task, m["t_malex"], m["t_art"],
                f"success {m['success_malex']:.0%} vs {m['success_art']:.0%}; mean L2 {m['l2_malex']:.3f} vs "
                f"{m['l2_art']:.3f}; on the {m['both']} both broke {m['l2_both_malex']:.3f} vs {m['l2_both_art']:.3f}")
    if "mahalanobis" in res:
        h = res["mahalanobis"]
        peer = f"pytorch-ood {h['pytorch_ood']} Mahalanobis"
        fit = f"fit on {h['n_fit']} x {h['dim']} features ({h['layer']})"
        row(peer, fit + ", malex default (a single layer is not cross-fitted)", h["t_fit_malex"], h["t_fit_ood"], "same class means and scatter")
        row(peer, fit + ", malex folds 1 set explicitly", h["t_fit1_malex"], h["t_fit_ood"], "")
        row(peer, f"score {h['n_score']} features (malex detector score)", h["t_score_malex"], h["t_score_ood"],
            f"ood / malex raw in [{h['ratio_min']:.6e}, {h['ratio_max']:.6e}] (1/(2N) = {h['factor']:.6e}); "
            f"Spearman {h['spearman_det']:.6f}")
        row(peer, f"score {h['n_score']} features (malex raw distance)", h["t_raw_malex"], h["t_score_ood"],
            f"max rel diff vs raw/(2N) {h['max_rel']:.1e}; Spearman {h['spearman_raw']:.6f}")
        row(peer, f"score {h['n_score']} images (malex probe pass + score; ood encoder + score)",
            h["t_probe_score_malex"] + h["t_score_malex"], h["t_encoder_score_ood"],
            f"encoder path vs features: max abs diff {h['encoder_max_abs']:.1e}")
    return rows


def setup_lines(res: dict, args: argparse.Namespace, start_load: str) -> list[str]:
    """What was run, on what, and the environment."""
    import scipy

    lines = []
    if "strip" in res:
        s = res["strip"]
        lines.append(
            f"STRIP: model `{args.backdoor_model}`; {s['n_clean']} seeded clean test inputs and {s['n_bd']} "
            f"BadNets-stamped ({args.trigger_size}x{args.trigger_size}, margin {args.trigger_margin}) non-target test "
            f"inputs that the model sends to target {args.target}; malex `Strip(model, StripConfig("
            f"n_overlays={s['k']}, alpha=0.5, seed={args.seed}))` fitted on the first {args.fit_n} validation "
            "inputs; ART `STRIP("
            "PyTorchClassifier(model + Softmax))(num_samples=k)` with validation_data = malex's overlays, its "
            "per-input draw fixed to all overlays in order, entropy_threshold = -inf (benchmarks/peer_strip.py's "
            "aligned run); ART's `predict` also runs one plain prediction of the inputs. Agreement: malex's score "
            "vs minus the per-blend mean entropy (nats) of the probabilities ART computed, and vs ART's value")
    if "cw" in res:
        lines.append(
            f"CW-L2: model `{args.clean_model}`; {res['cw']['n']} correctly classified test inputs (seeded); both: "
            f"confidence 0, {args.cw_steps} iterations x {args.cw_binary_search_steps} binary-search steps, "
            f"learning rate {args.cw_lr}, initial c {args.cw_c}, one batch; malex abort_early on (its default), ART "
            "max_halving/max_doubling 5/5 (defaults), as benchmarks/cw_vs_art.py; each attack run once (no repeats); "
            + (f"the reference row changes only malex's learning rate, to {args.cw_also_lr}; " if args.cw_also_lr > 0
               else "") +
            "success = prediction on the returned image wrong (targeted: = target); L2 in [0, 1] pixel units")
    if "mahalanobis" in res:
        h = res["mahalanobis"]
        lines.append(
            f"Mahalanobis: model `{args.clean_model}`, layer {h['layer']} ({h['dim']} units after ReLU); fitted on "
            f"the first {h['n_fit']} validation inputs with true labels; scored: {h['n_score']} inputs (STRIP's clean "
            "and BadNets inputs and malex's successful untargeted CW examples, as present); one malex probe pass "
            "gives both the same features. malex `Mahalanobis.penultimate(model)` (float64, pinv, ridge 0; folds 5 "
            "cross-fits the clean score statistics); pytorch-ood `Mahalanobis(None).fit_features(z, y)` / "
            "`predict_features(z)` (float32, inv(S + 1e-6 I)), and for the image row `Mahalanobis(encoder)` with an "
            f"encoder returning {h['layer']}. {h['dead_units']} units are zero on every fit input; {h['woken']} scored "
            "inputs switch any of them on (where one does, pytorch-ood's ridge inverse and malex's pseudo-inverse "
            "part ways)")
        lines.append(
            f"Mahalanobis ran in a subprocess of `{args.ood_python}`: Python {h['python']}, torch {h['torch']} (CPU), "
            f"pytorch-ood {h['pytorch_ood']}, {h['threads']} torch thread(s), load average {h['loadavg']} at its end. "
            "malex timed in the main venv on the same inputs: fit "
            f"{fmt_time(h['main_t_fit'])} (default) / {fmt_time(h['main_t_fit1'])} (folds 1), score "
            f"{fmt_time(h['main_t_score'])}, raw {fmt_time(h['main_t_raw'])}, probe pass "
            f"{fmt_time(h['main_t_probe_score'])}")
    import malex

    lines.append(
        f"environment (main process): Python {platform.python_version()}, torch {torch.__version__}, ART "
        f"{res.get('art_version', '-')}, malex {getattr(malex, '__version__', '?')}, numpy {np.__version__}, scipy "
        f"{scipy.__version__}, {os.cpu_count()} CPU cores (shared with other jobs), {torch.get_num_threads()} torch "
        f"thread(s) everywhere, CPU only; load average (1/5/15 min) {start_load} at start, {loadavg()} at end; "
        f"timings: median of {args.repeats} after a warm-up (CW: one run); "
        f"run {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    return lines


def write_markdown(path: Path, command: str, setup: list[str], rows: list[list[str]]) -> None:
    """The report, keeping a `## Notes` section already in `path`."""
    keep = ""
    if path.is_file():
        old = path.read_text()
        if NOTES in old:
            keep = old[old.index(NOTES):]
    md = ["# Speed against peers: ART STRIP, ART CarliniL2Method, pytorch-ood Mahalanobis", "",
          "Command (from the repository root, main venv; pytorch-ood runs in its own venv as a subprocess):", "",
          "```", command, "```", "", "## Setup", "", *[f"- {s}" for s in setup], "", "## Results", "",
          "peer / malex > 1: malex is faster.", "",
          "| " + " | ".join(HEADERS) + " |", "|---|---|---:|---:|---:|---|",
          *["| " + " | ".join(r) + " |" for r in rows], ""]
    if keep:
        md += [keep.rstrip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md))


def main(argv: list[str] | None = None) -> None:
    """Run the selected comparisons, print the summary table and write the Markdown file."""
    args = parse_args(argv)
    if args.worker is not None:
        mahalanobis_worker(args)
        return
    torch.set_num_threads(args.threads)
    start_load = loadavg()
    console = Console() if sys.stdout.isatty() else Console(width=200)
    from malex.data import load_dataset

    data = load_dataset("mnist", args.seed)
    res: dict = {}
    if "strip" in args.parts or "cw" in args.parts:
        import art

        res["art_version"] = art.__version__
    if "strip" in args.parts:
        res["strip"] = strip_part(args, data, console)
    if "cw" in args.parts:
        res["cw"] = cw_part(args, data, console)
    if "mahalanobis" in args.parts:
        if "strip" in res:
            parts = [res["strip"]["x_clean"], res["strip"]["x_bd"]]
        else:
            model, _ = load_model(args.backdoor_model)
            parts = list(strip_inputs(model.eval(), data, args))
        if "cw" in res and len(res["cw"].get("x_adv", [])):
            parts.append(res["cw"]["x_adv"])
        res["mahalanobis"] = mahalanobis_part(args, data, torch.cat(parts), console)

    rows = summary_rows(res, args)
    table = Table(title=f"malex vs peers ({args.threads} torch thread(s); peer / malex > 1: malex faster)")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="right" if 2 <= i <= 4 else "left")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    setup = setup_lines(res, args, start_load)
    for line in setup:
        console.print("- " + line)
    command = shlex.join(["python", "benchmarks/peers_speed.py", *(sys.argv[1:] if argv is None else argv)])
    write_markdown(args.out, command, setup, rows)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
