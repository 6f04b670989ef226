"""A study's tables: mean ± std over seeds of the finished cells (plain metrics dicts, one per cell, as the
study writes them), as rich tables, Markdown and CSV.

The standard deviation is the sample one (ddof = 1) over seeds; with one seed it is undefined and shown
as "–" (empty in CSV).

A backdoor cell marked `learnt: False` (its poisoned model's attack success rate is below the study's
`asr_floor`) is kept in results.csv but left out of every mean: a mean over fewer seeds says how many
("0.912 ± 0.010 (2 of 3 seeds; 1 not learnt)"), and a group with no learnt seed reads
"not learnt (ASR 0.440 < 0.85)".
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from rich.table import Table

from malex.detectors import FLOORS
from malex.atomic import atomic_write_bytes

#: (metrics.json key, column title) of the numbers every detector and guard row reports
METRICS: tuple[tuple[str, str], ...] = (
    ("auroc", "AUROC"),
    ("tpr_at_1fpr", "TPR@1%FPR"),
    ("tpr_at_5fpr", "TPR@5%FPR"),
    ("malicious_caught", "caught"),
    ("clean_fpr", "clean FPR"),
    ("detection_accuracy", "detection acc."),
)
CSV_FIELDS = ("dataset", "attack", "kind", "method", "model", "seed", "detector", *(k for k, _ in METRICS),
              "clean_pass", "n_clean", "n_malicious", "learnt")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std) of finite values; NaN when there are none, std NaN with a single value."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def fmt(mean: float, std: float, digits: int = 3) -> str:
    """'0.912 ± 0.010', '0.912 ± –' for one seed, '–' for no value."""
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f} ± –"


def _ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


# --- backdoors not learnt ------------------------------------------------------------------------------------

def _asr(cell: dict[str, Any]) -> float:
    return cell.get("model_summary", {}).get("attack_success_rate", math.nan)


def _learnt_split(cells: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the cells whose attack was learnt, or is not judged, and what the tables say of the others: the
    seeds not learnt with their ASR, and the floor)."""
    kept = [c for c in cells if c.get("learnt") is not False]
    lost = sorted(((c["seed"], _asr(c)) for c in cells if c.get("learnt") is False))
    return kept, {"not_learnt": lost, "asr_floor": next((c["asr_floor"] for c in cells if "asr_floor" in c), None)}


def not_learnt_text(not_learnt: Sequence[tuple[int, float]], floor: float | None) -> str:
    """'not learnt (ASR 0.440 < 0.85)'; several seeds give their range of ASR."""
    rates = sorted(a for _, a in not_learnt)
    asr = f"{rates[0]:.3f}" if len(rates) == 1 or rates[0] == rates[-1] else f"{rates[0]:.3f}–{rates[-1]:.3f}"
    return f"not learnt (ASR {asr} < {floor:g})" if floor is not None else f"not learnt (ASR {asr})"


def learnt_note(entry: dict[str, Any]) -> str:
    """'' when every seed of a summary entry was learnt, else '(2 of 3 seeds; 1 not learnt)'."""
    lost = len(entry.get("not_learnt", ()))
    return f"({len(entry['seeds'])} of {len(entry['seeds']) + lost} seeds; {lost} not learnt)" if lost else ""


def shown(entry: dict[str, Any], key: str, digits: int = 3) -> str:
    """A summary entry's (mean, std) of `key` as text: marked when seeds were not learnt, or 'not learnt (...)'
    when none was."""
    if entry.get("not_learnt") and not entry["seeds"]:
        return not_learnt_text(entry["not_learnt"], entry["asr_floor"])
    if not math.isfinite(entry[key][0]):
        return "–"
    return " ".join(filter(None, (fmt(*entry[key], digits=digits), learnt_note(entry))))


def summarise(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, attack, detector): every metric's mean and std over the seeds' cells whose attack
    was learnt (`seeds`), and the seeds not learnt with their ASR (`not_learnt`) and the floor."""
    groups: dict[tuple[str, str, str], list[tuple[dict, dict]]] = defaultdict(list)
    for cell in cells:
        for row in cell["rows"]:
            groups[(cell["dataset"], cell["attack"], row["detector"])].append((cell, row))
    out = []
    for (dataset, attack, detector), members in groups.items():
        cell0 = members[0][0]
        kept, lost = _learnt_split([c for c, _ in members])
        rows = [r for c, r in members if c.get("learnt") is not False]
        entry: dict[str, Any] = {"dataset": dataset, "attack": attack, "kind": cell0["kind"],
                                 "method": cell0["method"], "detector": detector,
                                 "seeds": sorted(c["seed"] for c in kept), **lost}
        for key, _ in METRICS + (("n_clean", ""), ("n_malicious", "")):
            entry[key] = mean_std([r.get(key, math.nan) for r in rows])
        out.append(entry)
    return out


def model_summary(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, model): clean accuracy and attack success rate, mean and std over every seed (the rate is
    what decides whether a seed's backdoor was learnt), the seeds judged and those not learnt."""
    seen: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for cell in cells:
        seen[(cell["dataset"], cell["model"])][cell["seed"]] = cell
    out = []
    for (d, m), per_seed in seen.items():
        sums = [c.get("model_summary", {}) for c in per_seed.values()]
        out.append({"dataset": d, "model": m,
                    "clean_accuracy": mean_std([s.get("clean_accuracy", math.nan) for s in sums]),
                    "attack_success_rate": mean_std([s.get("attack_success_rate", math.nan) for s in sums]),
                    "seeds": len(per_seed), "judged": sum(c.get("learnt") is not None for c in per_seed.values()),
                    **_learnt_split(list(per_seed.values()))[1]})
    return out


def attack_summary(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, attack): inputs kept, success rate and perturbation norms, mean and std over the seeds whose
    attack was learnt (`seeds`; the others in `not_learnt`)."""
    seen: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for cell in cells:
        seen[(cell["dataset"], cell["attack"])].append(cell)
    out = []
    for (d, a), members in seen.items():
        kept, lost = _learnt_split(members)
        sums = [c.get("attack_summary", {}) for c in kept]
        out.append({"dataset": d, "attack": a, **{k: members[0][k] for k in ("kind", "method", "model")},
                    "seeds": sorted(c["seed"] for c in kept), **lost,
                    **{k: mean_std([s.get(k, math.nan) for s in sums])
                       for k in ("n", "success_rate", "mean_l2", "mean_linf", "seconds")}})
    return out


# --- CSV -------------------------------------------------------------------------------------------------------

def _csv_text(fields: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else
                             f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def write_csv_rows(cells: Sequence[dict[str, Any]], path: Path) -> Path:
    """One CSV row per (cell, detector or guard); `learnt`: whether a backdoor cell's attack was learnt (empty
    for an adversarial one)."""
    rows = ({**{k: cell[k] for k in ("dataset", "attack", "kind", "method", "model", "seed")}, **row,
             "learnt": cell.get("learnt")} for cell in cells for row in cell["rows"])
    return atomic_write_bytes(path, _csv_text(CSV_FIELDS, rows).encode())


def write_summary_csv(summary: Sequence[dict[str, Any]], path: Path) -> Path:
    """One CSV row per (dataset, attack, detector): mean and std of every metric over the seeds whose attack was
    learnt (`n_seeds`), and how many were not (`n_not_learnt`, left out)."""
    fields = ["dataset", "attack", "kind", "method", "detector", "n_seeds", "n_not_learnt"]
    for key, _ in METRICS + (("n_clean", ""), ("n_malicious", "")):
        fields += [f"{key}_mean", f"{key}_std"]
    rows = []
    for s in summary:
        row = {k: s[k] for k in ("dataset", "attack", "kind", "method", "detector")} | {
            "n_seeds": len(s["seeds"]), "n_not_learnt": len(s.get("not_learnt", ()))}
        for key, _ in METRICS + (("n_clean", ""), ("n_malicious", "")):
            row[f"{key}_mean"], row[f"{key}_std"] = s[key]
        rows.append(row)
    return atomic_write_bytes(path, _csv_text(fields, rows).encode())


# --- tables as (header, rows) of strings, shared by Markdown, HTML and the terminal --------------------------

def auroc_matrix(summary: Sequence[dict[str, Any]], dataset: str) -> tuple[list[str], list[list[str]]]:
    """Rows: detectors (the guard last); columns: the dataset's attacks; cells: AUROC mean ± std."""
    rows = [s for s in summary if s["dataset"] == dataset]
    attacks = _ordered(s["attack"] for s in rows)
    detectors = _ordered(s["detector"] for s in rows)
    by = {(s["detector"], s["attack"]): s for s in rows}
    header = ["detector"] + [f"{a} ({next(s['kind'] for s in rows if s['attack'] == a)})" for a in attacks]
    body = [[d] + [shown(by[(d, a)], "auroc") if (d, a) in by else "–" for a in attacks] for d in detectors]
    return header, body


def attack_table(summary: Sequence[dict[str, Any]], dataset: str, attack: str) -> tuple[list[str], list[list[str]]]:
    """Rows: detectors and the guard; columns: every metric, mean ± std."""
    header = ["detector"] + [title for _, title in METRICS] + ["n clean / malicious"]
    body = []
    for s in summary:
        if s["dataset"] == dataset and s["attack"] == attack:
            n = f"{s['n_clean'][0]:.0f} / {s['n_malicious'][0]:.0f}" if s["seeds"] else "–"
            body.append([s["detector"]] + [shown(s, key) for key, _ in METRICS] + [n])
    return header, body


#: AUROC difference (best detector - best floor) within which the two are called level
LEVEL = 0.005


def _best(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the highest mean AUROC (ties: higher TPR at 1% FPR)."""
    scored = [r for r in rows if math.isfinite(r["auroc"][0])]
    return max(scored, key=lambda r: (r["auroc"][0], r["tpr_at_1fpr"][0])) if scored else None


def _auroc_tpr(row: dict[str, Any] | None, name: bool = True) -> str:
    if row is None:
        return "–"
    text = f"{fmt(*row['auroc'])} / {fmt(*row['tpr_at_1fpr'])}"
    return f"{row['detector']}: {text}" if name else text


def floor_table(summary: Sequence[dict[str, Any]], dataset: str, floors: Sequence[str], guard: str = "guard"
                ) -> tuple[list[str], list[list[str]]]:
    """Per attack: the best floor, the best other detector and the guard (AUROC / TPR at 1% FPR), and whether
    the best detector beats the best floor (by more than LEVEL in mean AUROC); a backdoor with seeds not learnt
    says so beside its name (means over the learnt seeds), one with none learnt reads 'not learnt'."""
    header = ["attack", "best floor: AUROC / TPR@1%", "best detector: AUROC / TPR@1%", "guard: AUROC / TPR@1%",
              "best detector vs floor"]
    body = []
    for attack in _ordered(s["attack"] for s in summary if s["dataset"] == dataset):
        rows = [s for s in summary if s["dataset"] == dataset and s["attack"] == attack]
        label = f"{attack} ({rows[0]['kind']})"
        if rows[0].get("not_learnt") and not rows[0]["seeds"]:
            body.append([label] + [not_learnt_text(rows[0]["not_learnt"], rows[0]["asr_floor"])] * 3 + ["–"])
            continue
        label = " ".join(filter(None, (label, learnt_note(rows[0]))))
        floor = _best([r for r in rows if r["detector"] in floors])
        method = _best([r for r in rows if r["detector"] not in floors and r["detector"] != guard])
        guard_row = next((r for r in rows if r["detector"] == guard), None)
        if floor is None or method is None:
            verdict = "–"
        else:
            gap = method["auroc"][0] - floor["auroc"][0]
            verdict = ("above" if gap > LEVEL else "below" if gap < -LEVEL else "level") + f" ({gap:+.3f})"
        body.append([label, _auroc_tpr(floor), _auroc_tpr(method), _auroc_tpr(guard_row, name=False), verdict])
    return header, body


def claim_table(summary: Sequence[dict[str, Any]], dataset: str, floors: Sequence[str], guard: str = "guard"
                ) -> tuple[list[str], list[list[str]]]:
    """The study's claim, per kind of attack: the mean over attacks of the guard's detection accuracy and
    AUROC, and of the best single detector's AUROC (floors excluded). A backdoor learnt on no seed is left out
    and named; one learnt on some seeds counts with their means and says so."""
    header = ["attacks", "n", "guard detection acc.", "guard AUROC", "best detector AUROC"]
    body = []
    for kind in ("backdoor", "adversarial"):
        named = _ordered(s["attack"] for s in summary if s["dataset"] == dataset and s["kind"] == kind)
        lost, attacks, names = [], [], []
        for attack in named:
            row0 = next(s for s in summary if s["dataset"] == dataset and s["attack"] == attack)
            if row0.get("not_learnt") and not row0["seeds"]:
                lost.append(attack)
            else:
                attacks.append(attack)
                names.append(" ".join(filter(None, (attack, learnt_note(row0)))))
        acc, auc, best = [], [], []
        for attack in attacks:
            rows = [s for s in summary if s["dataset"] == dataset and s["attack"] == attack]
            g = next((r for r in rows if r["detector"] == guard), None)
            if g is not None:
                acc.append(g["detection_accuracy"][0])
                auc.append(g["auroc"][0])
            b = _best([r for r in rows if r["detector"] not in floors and r["detector"] != guard])
            if b is not None:
                best.append(b["auroc"][0])
        if named:
            left_out = f"not learnt, left out: {', '.join(lost)}" if lost else ""
            label = f"{kind}: " + "; ".join(filter(None, (", ".join(names), left_out)))
            body.append([label, str(len(attacks)), fmt(*mean_std(acc)), fmt(*mean_std(auc)), fmt(*mean_std(best))])
    return header, body


# --- the guard's verdicts: the mixed stream's confusion matrices, summed over seeds -------------------------

#: (verdict key, column title) of the numbers reported per seed
VERDICT_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "three-way acc."),
    ("typed_right", "malicious typed right"),
    ("gap_member_auroc", "guard - best member AUROC"),
    ("gap_member_tpr_at_1fpr", "guard - best member TPR@1%"),
    ("gap_floor_auroc", "guard - best floor AUROC"),
)


def summarise_verdicts(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (dataset, attack) whose cells recorded verdicts: kind, seeds, labels, the summed confusion
    matrix, and (mean, std) of every `VERDICT_METRICS` key, over the seeds whose attack was learnt (`seeds`; the
    confusion is None when there is none, and `not_learnt` names the others)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for cell in cells:
        if cell.get("verdict", {}).get("confusion") is not None:
            groups.setdefault((cell["dataset"], cell["attack"]), []).append(cell)
    out = []
    for (dataset, attack), members in groups.items():
        kept, lost = _learnt_split(members)
        verdicts = [c["verdict"] for c in kept]
        entry: dict[str, Any] = {"dataset": dataset, "attack": attack, "kind": members[0]["kind"],
                                 "seeds": sorted(c["seed"] for c in kept), **lost,
                                 "labels": members[0]["verdict"]["labels"],
                                 "confusion": np.sum([np.asarray(v["confusion"]) for v in verdicts], axis=0)
                                 if verdicts else None}
        for key, _ in VERDICT_METRICS:
            entry[key] = mean_std([v.get(key, math.nan) for v in verdicts])
        out.append(entry)
    return out


def _shares(row: np.ndarray) -> str:
    total = row.sum()
    return " / ".join(f"{x / total:.3f}" for x in row) if total else "–"


def verdict_table(summary: Sequence[dict[str, Any]], dataset: str) -> tuple[list[str], list[list[str]]]:
    """Rows: the dataset's attacks; columns: every verdict metric (mean ± std) and the shares of each verdict
    among the clean and the malicious inputs (summed over seeds)."""
    rows = [s for s in summary if s["dataset"] == dataset]
    if not rows:
        return [], []
    labels = rows[0]["labels"]
    header = (["attack"] + [title for _, title in VERDICT_METRICS]
              + [f"clean called {' / '.join(labels)}", f"malicious called {' / '.join(labels)}"])
    body = []
    for s in rows:
        if s["confusion"] is None:
            body.append([f"{s['attack']} ({s['kind']})"] + [shown(s, key) for key, _ in VERDICT_METRICS] + ["–", "–"])
            continue
        matrix = np.asarray(s["confusion"])
        body.append([f"{s['attack']} ({s['kind']})"] + [shown(s, key) for key, _ in VERDICT_METRICS]
                    + [_shares(matrix[0]), _shares(matrix[labels.index(s["kind"])])])
    return header, body


def _learnt_column(m: dict[str, Any]) -> str:
    """A backdoor model's seeds learnt: '3 of 3 seeds', '2 of 3 seeds; seed 1 not learnt (ASR 0.440 < 0.85)'."""
    if not m.get("judged"):
        return "–"
    lost = m["not_learnt"]
    text = f"{m['judged'] - len(lost)} of {m['judged']} seeds"
    if lost:
        seeds = ", ".join(str(seed) for seed, _ in lost)
        text += f"; seed{'s' if len(lost) > 1 else ''} {seeds} {not_learnt_text(lost, m['asr_floor'])}"
    return text


def models_table(models: Sequence[dict[str, Any]], dataset: str) -> tuple[list[str], list[list[str]]]:
    """Clean accuracy and attack success rate over every seed, and the seeds whose backdoor was learnt."""
    header = ["model", "clean accuracy", "attack success rate", "seeds", "attack learnt"]
    body = [[m["model"], fmt(*m["clean_accuracy"]), fmt(*m["attack_success_rate"]), str(m["seeds"]),
             _learnt_column(m)] for m in models if m["dataset"] == dataset]
    return header, body


def attacks_table(attacks: Sequence[dict[str, Any]], dataset: str) -> tuple[list[str], list[list[str]]]:
    """Per attack, over the seeds whose attack was learnt: inputs kept, success rate, perturbation norms."""
    header = ["attack", "kind", "method", "model", "inputs kept", "success rate", "mean L2", "mean Linf"]
    body = [[a["attack"], a["kind"], a["method"], a["model"], shown(a, "n", digits=0), shown(a, "success_rate"),
             shown(a, "mean_l2"), shown(a, "mean_linf")] for a in attacks if a["dataset"] == dataset]
    return header, body


def numeric_columns(body: Sequence[Sequence[str]]) -> list[bool]:
    """Per column: whether every cell reads as a number (or '–'), to align it right."""
    if not body:
        return []
    return [all(re.match(r"^(–|-?\d|not learnt)", str(row[i])) for row in body) for i in range(len(body[0]))]


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    numeric = numeric_columns(body) or [False] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if n else "---|" for n in numeric)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def datasets_of(cells: Sequence[dict[str, Any]]) -> list[str]:
    return _ordered(c["dataset"] for c in cells)


def floor_sentence(cells: Sequence[dict[str, Any]]) -> str:
    """What the tables do with backdoors not learnt ('' when the cells were not judged against a floor)."""
    floor = _learnt_split(cells)[1]["asr_floor"]
    if floor is None:
        return ""
    lost = sum(c.get("learnt") is False for c in cells)
    return (f"A backdoor seed whose poisoned model's attack success rate (test split) is below {floor:g} is marked "
            "'not learnt': kept in results.csv (column learnt) and left out of every mean, which then says how many "
            f"seeds it holds ({lost} backdoor cell(s) not learnt here).")


def markdown(cells: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], missing: Sequence[str],
             seeds: Sequence[int], fpr: float) -> str:
    """The whole results.md; `missing`: the labels of the cells not finished."""
    lines = ["# Study results", "",
             f"Seeds: {', '.join(map(str, seeds))}. Every number is the mean ± sample std over the seeds' cells. "
             "Clean inputs: correctly classified test inputs; malicious inputs: successful attacks only. AUROC and "
             "TPR at 1% / 5% FPR are threshold-free, on the clean test scores. 'caught', 'clean FPR' and "
             f"'detection acc.' use each detector's threshold set at {fpr:.0%} FPR on a separate clean split, and "
             "the guard's own calibrated verdicts. " + floor_sentence(cells), ""]
    models, attacks, verdicts = model_summary(cells), attack_summary(cells), summarise_verdicts(cells)
    for dataset in datasets_of(cells):
        lines += [f"## {dataset}", "", "### Models", "", markdown_table(*models_table(models, dataset)), "",
                  "### Attacks", "", markdown_table(*attacks_table(attacks, dataset)), "",
                  "### AUROC", "", markdown_table(*auroc_matrix(summary, dataset)), "",
                  "### Against the floor", "",
                  f"The floors are {', '.join(FLOORS)}. 'above' / 'below': the best other detector's mean AUROC "
                  f"is more than {LEVEL} above / below the best floor's.", "",
                  markdown_table(*floor_table(summary, dataset, FLOORS)), "",
                  "### The study's claim: backdoor inputs are detected more accurately than adversarial ones", "",
                  "Means over the attacks of each kind (the ± here is the spread over attacks, not seeds).", "",
                  markdown_table(*claim_table(summary, dataset, FLOORS)), ""]
        header, body = verdict_table(verdicts, dataset)
        if body:
            lines += ["### The guard's verdicts on the mixed stream (clean test inputs + the attack's inputs)", "",
                      "Three-way accuracy (benign / adversarial / backdoor), the malicious inputs typed right, and the "
                      "guard's AUROC and TPR@1% minus those of its best member and of the best floor (mean ± std "
                      "over seeds); the shares of each verdict are over all seeds' inputs.", "",
                      markdown_table(header, body), ""]
        for attack in _ordered(s["attack"] for s in summary if s["dataset"] == dataset):
            kind = next(s["kind"] for s in summary if s["dataset"] == dataset and s["attack"] == attack)
            lines += [f"### {attack} ({kind})", "", markdown_table(*attack_table(summary, dataset, attack)), ""]
    if missing:
        lines += ["## Cells not finished", ""] + [f"- {label}" for label in missing] + [""]
    return "\n".join(lines)


def write_markdown(cells: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], missing: Sequence[str],
                   path: Path, seeds: Sequence[int], fpr: float, sections: Sequence[str] = ()) -> Path:
    """results.md: `markdown`, then each of `sections` (Markdown text, e.g. the adaptive attacks')."""
    return atomic_write_bytes(path, "\n".join([markdown(cells, summary, missing, seeds, fpr), *sections]).encode())


def rich_tables(summary: Sequence[dict[str, Any]]) -> list[Table]:
    """Per dataset, the AUROC table (detectors x attacks, mean ± std) for the terminal."""
    tables = []
    for dataset in _ordered(s["dataset"] for s in summary):
        header, body = auroc_matrix(summary, dataset)
        table = Table(title=f"{dataset}: AUROC (mean ± std over seeds)", header_style="bold")
        numeric = numeric_columns(body) or [False] * len(header)
        for col, is_number in zip(header, numeric):
            table.add_column(col, justify="right" if is_number else "left")
        for row in body:
            table.add_row(*row)
        tables.append(table)
    return tables
