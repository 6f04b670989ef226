"""malex's model-mutation detector against the reference design of model-mutation testing (Wang et al., ICSE 2019).

Run by hand from the repository root in the main venv (after the MNIST part of the study has trained its clean
model and crafted its attacks):

    python benchmarks/mutation_vs_reference.py --n 200 --n-reference 100 --repeats 3 --threads 1

The reference design (Wang et al., "Adversarial sample detection for deep neural network through model
mutation testing", ICSE 2019; its public Keras code) writes every mutant as a full model copy and, for each
input on its own, runs the input through mutant after mutant, counting label changes against the original
model's label, until a sequential probability ratio test (SPRT) decides or the mutants run out. Here that
design is rebuilt in PyTorch on exactly malex's mutants: `max_mutants` full `copy.deepcopy`s of the model
whose dense weights are replaced by malex's mutant i (the same Gaussian fuzzing, same seed), inputs at batch
1, the same SPRT (`det.sprt()`), the same final rule for undecided inputs (LCR against the fitted threshold).
By default the reference asks the SPRT after every `chunk` mutants, the decision points malex uses, so that
the mutants used, the LCRs and the verdicts must match exactly; `--reference-decide-every 1` asks it after
every mutant as the original does (then counts and verdicts may differ).

malex's time per input is the probe pass (the model's forward pass, which also captures the head's input)
plus `det.test(obs)`, the sequential test that re-runs only the mutated dense head on the cached head inputs,
many mutants at once. It is measured at batch `--batch` (default 256) and at batch 1, against the plain
forward pass (`predict_logits`) at the same batch sizes. Mutants are drawn once (malex at fit time, the
reference when it builds its copies); those one-off costs are reported apart. Measurements are interleaved
and repeated (`--repeats`, median), because the machine may be shared; the load average is recorded.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from malex.data import load_dataset
from malex.detectors import ModelMutation, MutationTest, make_detector
from malex.detectors.mutation import GaussianFuzzer
from malex.models import load_model
from malex.models.inference import predict_logits
from malex.report.table import rows_table
from malex.probe import Observation, Probe
from malex.progress import track

DEFAULT_MODEL = Path("malex-out/study-mnist-gtsrb/models/mnist/seed0/clean.safetensors")
DEFAULT_ATTACKS = Path("malex-out/study-mnist-gtsrb/attacks/mnist/seed0")
TARGET_FORWARD_RATIO = 3.0  # issue 6: malex <= 3x the plain forward pass per input
TARGET_SPEEDUP = 20.0  # issue 6: malex >= 20x faster than the reference design


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a malex model file")
    p.add_argument("--dataset", default="mnist", help="dataset of the model (clean validation and test inputs)")
    p.add_argument("--seed", type=int, default=0, help="dataset split seed")
    p.add_argument("--attacks-dir", type=Path, default=DEFAULT_ATTACKS, help="folder of the study's attack files")
    p.add_argument("--attacks", nargs="*", default=["pgd", "cw"],
                   help="attack files <name>.safetensors to read from --attacks-dir (missing ones are skipped)")
    p.add_argument("--detector", default="mutation_adv", help="registered mutation detector to build")
    p.add_argument("--n", type=int, default=200, help="inputs per kind timed for malex and the plain forward pass")
    p.add_argument("--n-reference", type=int, default=None,
                   help="inputs per kind (the first of the --n) run through the reference design (default: --n)")
    p.add_argument("--n-fit", type=int, default=1000, help="clean validation inputs the detector is fitted on")
    p.add_argument("--batch", type=int, default=256, help="batch size of the batched measurements")
    p.add_argument("--reference-decide-every", type=int, default=None,
                   help="mutants between the reference's SPRT decisions (default: malex's chunk)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median taken)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mutation_vs_reference.md"))
    return p.parse_args(argv)


# --- inputs ------------------------------------------------------------------------------------------------------
def load_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """Clean validation inputs to fit on, the benchmark inputs by kind, and notes on what was skipped."""
    ds = load_dataset(args.dataset, args.seed)
    kinds = {"clean": ds.test.x[: args.n]}
    notes = []
    for name in args.attacks:
        path = args.attacks_dir / f"{name}.safetensors"
        if not path.is_file():
            notes.append(f"{path} not found: kind {name!r} skipped")
            continue
        kinds[name] = load_file(str(path))["x"][: args.n].float()
    return ds.val.x[: args.n_fit], kinds, notes


# --- malex ---------------------------------------------------------------------------------------------------------
def malex_run(det: ModelMutation, probe: Probe, x: torch.Tensor, batch: int) -> MutationTest:
    """Probe pass and sequential test over `x`, `batch` inputs at a time (as a caller screening batches would)."""
    parts = []
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch]
        parts.append(det.test(probe.run(xb, batch_size=batch)))
    return MutationTest(lcr=np.concatenate([p.lcr for p in parts]),
                        n_mutants=np.concatenate([p.n_mutants for p in parts]),
                        decision=np.concatenate([p.decision for p in parts]))


def probe_batches(probe: Probe, x: torch.Tensor, batch: int) -> list[Observation]:
    """The probe pass alone, `batch` inputs at a time."""
    return [probe.run(x[start : start + batch], batch_size=batch) for start in range(0, x.shape[0], batch)]


def test_each(det: ModelMutation, observations: list[Observation]) -> list[MutationTest]:
    """The sequential test alone, on observations made beforehand."""
    return [det.test(obs) for obs in observations]


def joined(tests: list[MutationTest], attr: str, head: bool = False, *, cut: list[int]) -> np.ndarray:
    """One field of several tests, concatenated; with `head`, only the first `cut[i]` inputs of test i."""
    return np.concatenate([getattr(t, attr)[:c] if head else getattr(t, attr) for t, c in zip(tests, cut)])


# --- the reference design --------------------------------------------------------------------------------------
def module_path(model: nn.Module, module: nn.Module) -> str:
    """The name of `module` inside `model` ('' for the model itself)."""
    return next(name for name, m in model.named_modules() if m is module)


def build_reference_mutants(model: nn.Module, det: ModelMutation) -> list[nn.Module]:
    """`max_mutants` full copies of `model`, copy i carrying malex's mutant i in its dense layers.

    The mutant weights are drawn by a fuzzer identical to the detector's (same module, strength and seed) but
    without a cache, so that drawing is part of the construction time, as in the reference design."""
    fuzzer = GaussianFuzzer(det.fuzzer.weights, det.strength, det.config.seed)
    prefix = module_path(model, det.module)
    mutants = []
    for i in range(det.config.max_mutants):
        params = fuzzer.mutants(range(i, i + 1))
        mutant = copy.deepcopy(model).eval()
        target = mutant.get_submodule(prefix) if prefix else mutant
        with torch.no_grad():
            for name, stacked in params.items():
                target.get_parameter(name).copy_(stacked[0])
        mutants.append(mutant)
    return mutants


def check_same_mutants(model: nn.Module, det: ModelMutation, mutants: list[nn.Module]) -> bool:
    """Do the copies carry exactly the detector's own mutants (as `det.fuzzer` gives them, chunk by chunk)?"""
    prefix = module_path(model, det.module)
    cfg = det.config
    for start in range(0, cfg.max_mutants, cfg.chunk):
        params = det.fuzzer.mutants(range(start, min(start + cfg.chunk, cfg.max_mutants)))
        for j, i in enumerate(range(start, min(start + cfg.chunk, cfg.max_mutants))):
            target = mutants[i].get_submodule(prefix) if prefix else mutants[i]
            if not all(torch.equal(target.get_parameter(n), p[j]) for n, p in params.items()):
                return False
    return True


@torch.no_grad()
def reference_run(model: nn.Module, mutants: list[nn.Module], det: ModelMutation, x: torch.Tensor,
                  decide_every: int, progress: bool) -> MutationTest:
    """Wang et al.'s per-input loop: original label, then mutant after mutant at batch 1 until the SPRT decides."""
    sprt = det.sprt()
    threshold = det.lcr_threshold_
    high = det.config.suspicious == "high"
    n = x.shape[0]
    lcr, used_all, decision = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int8)
    model.eval()
    for j in track(range(n), "reference (inputs)", enabled=progress):
        xi = x[j : j + 1]
        label = model(xi).argmax(dim=1)
        changes = used = 0
        verdict = 0
        for mutant in mutants:
            changes += int(mutant(xi).argmax(dim=1) != label)
            used += 1
            if used % decide_every == 0 or used == len(mutants):
                verdict = int(sprt.decide(np.array([changes]), np.array([used]))[0])
                if verdict != 0:
                    break
        rate = changes / used
        if verdict == 0:  # malex's final rule for inputs the SPRT left undecided
            verdict = 1 if (rate > threshold if high else rate < threshold) else -1
        lcr[j], used_all[j], decision[j] = rate, used, verdict
    return MutationTest(lcr=lcr, n_mutants=used_all, decision=decision)


# --- arithmetic ----------------------------------------------------------------------------------------------------
def multiply_adds(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Multiply-adds per input of the whole model's Conv2d and Linear layers, and of those inside `module`."""
    inside = {id(m) for m in module.modules()}
    counts = {"all": 0, "module": 0}

    def hook(m: nn.Module, _args, out: torch.Tensor) -> None:
        per_out = (m.in_channels // m.groups) * int(np.prod(m.kernel_size)) if isinstance(m, nn.Conv2d) else m.in_features
        macs = out[0].numel() * per_out
        counts["all"] += macs
        if id(m) in inside:
            counts["module"] += macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return counts["all"], counts["module"]


# --- timing --------------------------------------------------------------------------------------------------------
@dataclass
class Timings:
    """Seconds per repeat for each (kind, measurement)."""

    runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, kind: str, what: str, seconds: float) -> None:
        self.runs.setdefault((kind, what), []).append(seconds)

    def median(self, kind: str, what: str) -> float:
        return statistics.median(self.runs[(kind, what)])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def fmt_ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.n_reference = args.n if args.n_reference is None else args.n_reference
    if args.n_reference > args.n or min(args.n, args.n_reference, args.repeats, args.batch) < 1:
        raise SystemExit("expected 1 <= --n-reference <= --n, and --repeats, --batch >= 1")
    torch.set_num_threads(args.threads)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    progress = not args.no_progress
    load_before = os.getloadavg()

    model, desc = load_model(args.model)
    x_fit, kinds, notes = load_inputs(args)
    det = make_detector(args.detector, model)
    if not isinstance(det, ModelMutation):
        raise SystemExit(f"{args.detector!r} is not a model-mutation detector")
    cfg = det.config
    decide_every = args.reference_decide_every or cfg.chunk
    probe = Probe(model, det.layers())

    # one-off costs: fitting (draws and caches malex's mutants), drawing mutants afresh, building full copies
    t_fit, _ = timed(lambda: det.fit(probe.run(x_fit)))
    fresh = GaussianFuzzer(det.fuzzer.weights, det.strength, cfg.seed)  # no cache: every call draws
    t_draw, _ = timed(lambda: [fresh.mutants(range(s, min(s + cfg.chunk, cfg.max_mutants)))
                               for s in range(0, cfg.max_mutants, cfg.chunk)])
    t_build, mutants = timed(lambda: build_reference_mutants(model, det))
    same_mutants = check_same_mutants(model, det, mutants)
    bytes_full = sum(p.numel() * p.element_size() for p in model.parameters())
    macs_all, macs_head = multiply_adds(model, det.module, x_fit)

    # warm-up (first calls allocate and pick kernels)
    warm = next(iter(kinds.values()))[:8]
    malex_run(det, probe, warm, args.batch)
    malex_run(det, probe, warm[:2], 1)
    predict_logits(model, warm, args.batch)
    reference_run(model, mutants, det, warm[:2], decide_every, progress=False)

    timings = Timings()
    results: dict[tuple[str, str], MutationTest] = {}
    for r in range(args.repeats):  # interleaved: each repeat measures everything once, kind by kind
        for kind, x in kinds.items():
            xr = x[: args.n_reference]
            steps: list[tuple[str, Callable[[], object]]] = [
                ("plain_b", partial(predict_logits, model, x, args.batch)),
                ("malex_b", partial(malex_run, det, probe, x, args.batch)),
                ("plain_1", partial(predict_logits, model, x, 1)),
                ("malex_1", partial(malex_run, det, probe, x, 1)),
                ("reference", partial(reference_run, model, mutants, det, xr, decide_every, progress)),
            ]
            for what, fn in steps:
                seconds, out = timed(fn)
                timings.add(kind, what, seconds)
                if isinstance(out, MutationTest):
                    prev = results.get((kind, what))
                    if prev is not None and not np.array_equal(prev.decision, out.decision):
                        notes.append(f"{kind}/{what}: verdicts changed between repeats")
                    results[(kind, what)] = out
        if progress:
            console.print(f"[dim]repeat {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}[/dim]")
    # where malex's time goes: the probe pass against the mutants, at both batch sizes (separate runs, after the rest)
    split: dict[tuple[str, int], tuple[float, float]] = {}
    for kind, x in kinds.items():
        for batch in (args.batch, 1):
            probes, tests = [], []
            for _ in range(args.repeats):
                t_probe, obs = timed(partial(probe_batches, probe, x, batch))
                t_test, _ = timed(partial(test_each, det, obs))
                probes.append(t_probe)
                tests.append(t_test)
            split[(kind, batch)] = (statistics.median(probes) / x.shape[0], statistics.median(tests) / x.shape[0])
    load_after = os.getloadavg()

    # --- tables ---------------------------------------------------------------------------------------------------
    def per_input(kind_list: list[str], what: str) -> float:
        count = (lambda k: min(args.n_reference, len(kinds[k]))) if what == "reference" else (lambda k: len(kinds[k]))
        return sum(timings.median(k, what) for k in kind_list) / sum(count(k) for k in kind_list)

    groups = [(k, [k]) for k in kinds] + ([("overall", list(kinds))] if len(kinds) > 1 else [])
    time_rows, agree_rows, ratios = [], [], {}
    for label, ks in groups:
        n = sum(len(kinds[k]) for k in ks)
        n_ref = sum(min(args.n_reference, len(kinds[k])) for k in ks)
        t = {w: per_input(ks, w) for w in ("plain_b", "malex_b", "plain_1", "malex_1", "reference")}
        ratios[label] = t
        time_rows.append([label, str(n), str(n_ref), fmt_ms(t["plain_b"]), fmt_ms(t["malex_b"]),
                          fmt_ratio(t["malex_b"] / t["plain_b"]), fmt_ms(t["plain_1"]), fmt_ms(t["malex_1"]),
                          fmt_ratio(t["malex_1"] / t["plain_1"]), fmt_ms(t["reference"]),
                          fmt_ratio(t["reference"] / t["malex_b"]), fmt_ratio(t["reference"] / t["malex_1"])])
        mb = [results[(k, "malex_b")] for k in ks]
        m1 = [results[(k, "malex_1")] for k in ks]
        ref = [results[(k, "reference")] for k in ks]
        cut = [min(args.n_reference, len(kinds[k])) for k in ks]
        cat = partial(joined, cut=cut)
        mb_dec, ref_dec = cat(mb, "decision", True), cat(ref, "decision")
        agree_rows.append([
            label, str(n_ref),
            f"{cat(mb, 'n_mutants').mean():.1f}", f"{cat(mb, 'n_mutants', True).mean():.1f}",
            f"{cat(ref, 'n_mutants').mean():.1f}",
            f"{np.mean(mb_dec == ref_dec):.1%}",
            f"{np.mean(cat(mb, 'lcr', True) == cat(ref, 'lcr')):.1%}",
            f"{np.mean(cat(mb, 'n_mutants', True) == cat(ref, 'n_mutants')):.1%}",
            f"{np.mean(cat(mb, 'decision') == cat(m1, 'decision')):.1%}",
            f"{np.mean(cat(mb, 'decision') == 1):.1%}", f"{np.mean(ref_dec == 1):.1%}",
        ])
    time_headers = ["inputs", "n", "n ref", f"plain b{args.batch}", f"malex b{args.batch}",
                    f"malex/plain b{args.batch}", "plain b1", "malex b1", "malex/plain b1", "reference b1",
                    f"ref/malex b{args.batch}", "ref/malex b1"]
    agree_headers = ["inputs", "n ref", "mutants/input malex (all n)", "mutants/input malex (ref inputs)",
                     "mutants/input reference", "verdict agreement", "LCR equal", "mutant count equal",
                     f"malex b{args.batch} = b1 verdicts (all n)", "malex flagged (all n)", "reference flagged"]
    split_rows = []
    mean_mutants = {k: float(results[(k, "malex_b")].n_mutants.mean()) for k in kinds}
    for kind in kinds:
        (p_b, t_b), (p_1, t_1) = split[(kind, args.batch)], split[(kind, 1)]
        chunks = float(np.mean(np.ceil(results[(kind, "malex_1")].n_mutants / cfg.chunk)))
        split_rows.append([kind, f"{mean_mutants[kind]:.1f}", f"{1 + mean_mutants[kind] * macs_head / macs_all:.2f}x",
                           fmt_ms(p_b), fmt_ms(t_b), f"{1e6 * t_b / mean_mutants[kind]:.2f}",
                           fmt_ratio((p_b + t_b) / ratios[kind]["plain_b"]),
                           fmt_ms(p_1), fmt_ms(t_1), f"{chunks:.1f}", fmt_ms(t_1 / chunks),
                           fmt_ratio((p_1 + t_1) / ratios[kind]["plain_1"])])
    split_headers = ["inputs", "mutants/input", "multiply-adds vs model (1 + mutants x head/model)",
                     f"probe ms/input b{args.batch}", f"det.test ms/input b{args.batch}",
                     f"det.test us per input-mutant b{args.batch}", f"malex/plain b{args.batch}",
                     "probe ms/input b1", "det.test ms/input b1", "chunks/input", "det.test ms per chunk b1",
                     "malex/plain b1"]
    oneoff_rows = [
        [(f"malex fit on {len(x_fit)} clean validation inputs (probe + strength {det.strength:.3g} + LCR "
         f"threshold; draws and caches the {cfg.max_mutants} mutants)"), f"{t_fit:.3f}", ""],
        [f"malex: draw {cfg.max_mutants} mutants' dense weights (stacked, chunks of {cfg.chunk}, no cache)",
         f"{t_draw:.3f}", f"{fresh.bytes_per_mutant / 2**20:.2f} MiB per mutant (dense weights only)"],
        [f"reference: build {cfg.max_mutants} full model copies (draw + copy.deepcopy + load dense weights)",
         f"{t_build:.3f}", f"{bytes_full / 2**20:.2f} MiB per mutant (all parameters)"],
    ]
    oneoff_headers = ["one-off step", "seconds", "memory"]

    tables = [
        ("Time per input, ms (median of repeats; malex = probe pass + sequential test)", time_headers, time_rows),
        ("Mutants used and agreement on the reference inputs", agree_headers, agree_rows),
        ("Where malex's time goes (separate runs, median of repeats)", split_headers, split_rows),
        ("One-off costs", oneoff_headers, oneoff_rows),
    ]
    for title, headers, body in tables:
        console.print(rows_table(title, headers, body))

    overall = ratios["overall" if len(kinds) > 1 else next(iter(kinds))]
    fwd_b, fwd_1 = overall["malex_b"] / overall["plain_b"], overall["malex_1"] / overall["plain_1"]
    speed_b, speed_1 = overall["reference"] / overall["malex_b"], overall["reference"] / overall["malex_1"]
    head_share = macs_head / macs_all
    probe_1 = sum(split[(k, 1)][0] * len(kinds[k]) for k in kinds) / sum(len(v) for v in kinds.values())
    test_1 = sum(split[(k, 1)][1] * len(kinds[k]) for k in kinds) / sum(len(v) for v in kinds.values())
    chunks_1 = float(np.mean(np.ceil(np.concatenate([results[(k, "malex_1")].n_mutants for k in kinds]) / cfg.chunk)))
    mean_all = float(np.mean(np.concatenate([results[(k, "malex_b")].n_mutants for k in kinds])))
    command = shlex.join(["python", "benchmarks/mutation_vs_reference.py", *(sys.argv[1:] if argv is None else argv)])
    setup = [
        (f"model: `{args.model}` ({desc.get('arch')}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{macs_all:,} multiply-adds per input, of which the mutated module `{module_path(model, det.module) or '(model)'}` "
        f"{macs_head:,} = {head_share:.1%})"),
        (f"detector: `make_detector({args.detector!r}, model)`: strength r = {det.strength:.3g}, suspicious "
        f"{cfg.suspicious!r}, max_mutants {cfg.max_mutants}, chunk {cfg.chunk}, SPRT alpha {cfg.alpha}, beta "
        f"{cfg.beta}, indifference {cfg.indifference}; fitted on {len(x_fit)} clean validation inputs of "
        f"{args.dataset} (split seed {args.seed}): LCR threshold {det.lcr_threshold_:.3f} (clean mean "
        f"{det.clean_lcr_mean_:.3f}), SPRT p0 {det.sprt().p0:.3f}, p1 {det.sprt().p1:.3f}"),
        "inputs: " + ", ".join(f"{k} {len(v)}" for k, v in kinds.items()) + f" (clean: the first {args.n} test "
        "inputs" + (f"; attacks: the first {args.n} of the study's files in `{args.attacks_dir}`, which hold only "
                    "successful adversarial examples" if len(kinds) > 1 else "") + "); the reference runs on the first "
        f"{args.n_reference} of each kind" + ("" if not notes else "; " + "; ".join(notes)),
        (f"malex b{args.batch}: `Probe(model, det.layers()).run(xb)` then `det.test(obs)` per batch of {args.batch}; "
        f"malex b1: the same, one input at a time; plain: `predict_logits(model, x, batch_size)` at the same batch "
        "sizes. Mutants are drawn at fit time and cached by the detector (its `cache_mb`), so the timed tests "
        "only run them"),
        f"reference: {cfg.max_mutants} `copy.deepcopy(model)`s whose dense weights are malex's mutants "
        f"(identical tensors: {'checked, all equal' if same_mutants else 'CHECK FAILED'}); per input at batch 1: "
        f"the original model's label, then mutant after mutant (`mutant(x)` under no_grad, eval mode), SPRT "
        f"`det.sprt().decide` after every {decide_every} mutant(s)"
        + (" (= malex's decision points, so mutant counts, LCRs and verdicts must match)" if decide_every == cfg.chunk
           else f" (malex decides after every {cfg.chunk}: counts and verdicts may differ)")
        + f", at most {cfg.max_mutants}; undecided inputs get malex's final rule (LCR "
        f"{'>' if cfg.suspicious == 'high' else '<'} threshold: suspicious). Its per-input time is measured on "
        f"the first {args.n_reference} inputs of each kind (batch 1, so cost is per input) and compared per input",
        (f"timing: {args.repeats} interleaved repeats (each repeat: plain b{args.batch}, malex b{args.batch}, plain "
        "b1, malex b1, reference, kind by kind), median per measurement; one warm-up call of each first"),
        f"environment: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), CPU only; "
        f"load average (1, 5, 15 min) {', '.join(f'{v:.1f}' for v in load_before)} before and "
        f"{', '.join(f'{v:.1f}' for v in load_after)} after: "
        + ("other jobs were running, so absolute times are noisy" if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1)
           else "the machine was mostly idle")
        + f"; run {dt.datetime.now():%Y-%m-%d %H:%M}",
    ]
    findings = [
        (f"Target malex <= {TARGET_FORWARD_RATIO:g}x the plain forward pass per input: "
        f"{fwd_b:.2f}x at batch {args.batch} ({'met' if fwd_b <= TARGET_FORWARD_RATIO else 'NOT met'}), "
        f"{fwd_1:.2f}x at batch 1 ({'met' if fwd_1 <= TARGET_FORWARD_RATIO else 'NOT met'})."),
        (f"Target malex >= {TARGET_SPEEDUP:g}x faster than the reference: {speed_b:.1f}x with malex at batch "
        f"{args.batch} ({'met' if speed_b >= TARGET_SPEEDUP else 'NOT met'}), {speed_1:.1f}x with malex also at "
        f"batch 1 ({'met' if speed_1 >= TARGET_SPEEDUP else 'NOT met'})."),
        f"Arithmetic: one mutant re-runs only the dense head, {head_share:.1%} of the model's multiply-adds; "
        f"with {mean_all:.1f} mutants per input on average (the SPRT stops at chunk boundaries, at most "
        f"{cfg.max_mutants}) the mutants alone are {mean_all * head_share:.2f} forward passes' worth of "
        f"multiply-adds, i.e. malex does about {1 + mean_all * head_share:.2f}x the plain forward pass's "
        f"arithmetic at these settings ({1 + cfg.max_mutants * head_share:.2f}x with all {cfg.max_mutants} "
        "mutants). The time ratio at batch {b} can come out below that, because the batched dense matrix "
        "products run at a higher rate than the convolutions of the forward pass, but it follows the mean number "
        "of mutants per input.".replace("{b}", str(args.batch)),
        (f"At batch 1 malex spends {fmt_ms(probe_1)} ms per input in the probe pass and {fmt_ms(test_1)} ms in "
        f"`det.test` for {chunks_1:.1f} chunks of {cfg.chunk} mutants, i.e. {fmt_ms(test_1 / chunks_1)} ms per "
        "chunk (the head products of the chunk's mutants for one input, plus fixed per-call costs: Python "
        "dispatch, SPRT bookkeeping)."),
        (f"One-off: malex draws its {cfg.max_mutants} mutants in {t_draw:.2f} s and keeps "
        f"{cfg.max_mutants * fresh.bytes_per_mutant / 2**20:.1f} MiB of dense weights; the reference builds "
        f"{cfg.max_mutants} full copies in {t_build:.2f} s ({cfg.max_mutants * bytes_full / 2**20:.1f} MiB)."),
    ]
    for line in setup + findings:
        console.print("- " + line)

    def md_table(headers: list[str], body: list[list[str]]) -> list[str]:
        out = ["| " + " | ".join(headers) + " |", "|---|" + "|".join(["---:"] * (len(headers) - 1)) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in body]

    md = ["# Model mutation: malex vs the reference design (Wang et al., ICSE 2019)", "",
          "Command (from the repository root, main venv):", "", "```", command, "```", "",
          "## Setup", "", *[f"- {s}" for s in setup], ""]
    for title, headers, body in tables:
        md += [f"## {title}", "", *md_table(headers, body), ""]
    md += ["## Computed from the tables", "", *[f"- {s}" for s in findings], ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
