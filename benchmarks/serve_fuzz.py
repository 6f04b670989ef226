"""Fuzz the HTTP service against its own OpenAPI schema with schemathesis, on loopback only.

Run by hand from the repository root (needs the `serve` and `bench` extras):

    python benchmarks/serve_fuzz.py --max-examples 300 --max-time 300

Starts `malex serve` (the cached BadNets digits model and its guard, see serve_setup.py) on a free
loopback port, loads /openapi.json, and for every operation draws cases from schemathesis's strategies
in both generation modes (positive: bodies and parameters the schema allows; negative: ones it does not),
at most `--max-examples` per operation and mode and `--max-time` seconds in all. Every response is
checked for a server error (5xx) and against the schema (status codes, content types, response
bodies). Prints the number of cases, the statuses seen, every 5xx (with a curl line to reproduce it)
and the schema-check failures. Only the examples and fuzzing phases run (schemathesis's coverage phase
stalled for minutes on its own side); the service runs with an API key, which every case carries.

Then the hostile corpus (`serve_hostile.py`, every case of issue 16: 8 MB bodies of empty lists, three
at once, deep nesting, float128 and complex .npy, a 10 GB Content-Length, disconnects mid-upload,
malformed request lines and headers, a foreign Host header, no API key, slowloris heads and bodies, 300
idle connections): per case the answers, whether /healthz answered right after, and the service's CPU
milliseconds per request (from /proc/PID/stat, over `repeat` runs). Exits 1 when any 5xx (other than a
503 for a connection over the cap) was answered or the service was unhealthy after a case.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from rich.console import Console
from rich.table import Table
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from serve_hostile import exchange, hostile_cases, request
from serve_setup import ServiceProcess, add_serve_args, guard_files

from malex.data import load_digits

SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(p)
    p.add_argument("--max-examples", type=int, default=300, help="cases per operation and generation mode")
    p.add_argument("--max-time", type=float, default=300.0, help="seconds for the whole run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_fuzz.md"))
    p.add_argument("--request-read-s", type=float, default=2.0, help="service: request-read timeout")
    p.add_argument("--skip-schemathesis", action="store_true", help="run the hostile corpus only")
    return p.parse_args(argv)


def cpu_ms(pid: int) -> float:
    """CPU milliseconds (user + system) process `pid` has used (Linux /proc, 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def hostile(port: int, pid: int, headers: dict, console: Console) -> list[list[str]]:
    """Every hostile case: answers, healthy after, server CPU ms per run; one table row each."""
    rows = []
    for case in hostile_cases(tuple(load_digits(0).test.x.shape[1:])):
        before = cpu_ms(pid)
        answers: Counter = Counter()
        for _ in range(case.repeat):
            answers.update(case.run(port, headers))
        per_run = (cpu_ms(pid) - before) / case.repeat
        healthy = exchange(port, request("GET", "/healthz")) == "200"
        ok = healthy and set(answers) <= set(case.expected)
        rows.append([case.name, ", ".join(f"{a}: {n}" for a, n in sorted(answers.items())), str(healthy),
                     f"{per_run:.0f}", "yes" if ok else f"NO (expected {', '.join(case.expected)})"])
        console.print(f"{case.name}: {rows[-1][1]}; healthy {healthy}; {per_run:.0f} ms CPU per run", markup=False)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    model_path, guard_path, origin = guard_files(args)
    console.print(origin)
    statuses: Counter = Counter()
    cases: Counter = Counter()
    server_errors: list[str] = []
    schema_failures: Counter = Counter()
    examples: dict[str, str] = {}
    started = time.perf_counter()

    def check(case, label: str) -> None:
        """Send one case and check its response."""
        if time.perf_counter() - started > args.max_time:
            return
        response = case.call(base_url=url, timeout=60, headers=auth)
        cases[label] += 1
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except Exception:  # a 5xx
            server_errors.append(f"{label}: {response.status_code} {response.text[:300]}\n"
                                 f"  {case.as_curl_command()}")
        for schema_check in SCHEMA_CHECKS:
            try:
                case.validate_response(response, checks=[schema_check])
            except Exception as exc:
                schema_failures[(label, schema_check.__name__)] += 1
                examples.setdefault(f"{label} {schema_check.__name__}",
                                    f"{str(exc)[:400]}\n  {case.as_curl_command()[:300]}")

    def fuzz(op, mode: GenerationMode, label: str) -> None:
        """Up to --max-examples cases of one operation in one generation mode, each checked."""

        @settings(max_examples=args.max_examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            check(case, label)

        try:
            run()
        except Unsatisfiable:  # nothing in the operation can be made invalid (no parameters, no body)
            cases.setdefault(label, 0)

    def examples_of(op, label: str) -> None:
        """The examples the schema gives for an operation (a few draws of each)."""
        for strategy in op.get_strategies_from_examples():
            @settings(max_examples=5, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case) -> None:
                check(case, label)

            run()

    key = secrets.token_urlsafe(24)
    auth = {"Authorization": f"Bearer {key}"}
    with tempfile.NamedTemporaryFile("w", suffix=".key") as key_file:
        key_file.write(key)
        key_file.flush()
        service = ServiceProcess(model_path, guard_path, args, "--api-key-file", key_file.name,
                                 "--request-read-s", str(args.request_read_s), "--open-endpoint", "/healthz")
        with service as url:
            if not args.skip_schemathesis:
                schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=auth)
                for op in [op.ok() for op in schema.get_all_operations()]:
                    examples_of(op, f"{op.method.upper()} {op.path} (schema examples)")
                    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                        fuzz(op, mode, f"{op.method.upper()} {op.path} ({mode.value})")
            seconds = time.perf_counter() - started
            corpus = hostile(service.port, service.proc.pid, auth, console)
            log_lines = service.log_text().splitlines()
    tracebacks = sum("Traceback" in line for line in log_lines)
    total = sum(cases.values())
    table = Table(title=f"schemathesis {schemathesis.SCHEMATHESIS_VERSION}: {total} cases in {seconds:.0f}s")
    for col in ("operation (mode)", "cases"):
        table.add_column(col, justify="right" if col == "cases" else "left")
    for label, n in cases.items():
        table.add_row(label, str(n))
    console.print(table)
    console.print("statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    console.print(f"5xx responses: {len(server_errors)}")
    for line in server_errors[:20]:
        console.print(line, markup=False)
    console.print(f"schema-check failures: {sum(schema_failures.values())}")
    for (label, check), n in schema_failures.items():
        console.print(f"  {label} {check}: {n}", markup=False)
    for key, text in list(examples.items())[:10]:
        console.print(f"  e.g. {key}:\n    {text}", markup=False)
    lines = [
        "# HTTP service fuzz run (schemathesis)",
        "",
        f"`python benchmarks/serve_fuzz.py --max-examples {args.max_examples} --max-time {args.max_time:g}`"
        f" (schemathesis {schemathesis.SCHEMATHESIS_VERSION}, loopback; guard: {args.detectors})",
        "",
        f"{total} cases in {seconds:.0f} s; 5xx responses: {len(server_errors)}; "
        f"schema-check failures: {sum(schema_failures.values())}",
        "",
        "| operation (generation mode) | cases |",
        "|---|---:|",
        *[f"| {label} | {n} |" for label, n in cases.items()],
        "",
        "Statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
        "",
        "## Hostile corpus",
        "",
        f"`python benchmarks/serve_fuzz.py` (same run; service with `--request-read-s {args.request_read_s:g}`, "
        "default `--max-connections 256`; CPU: the service process's user + system time, 10 ms ticks, "
        "divided by the runs)",
        "",
        "| case | answers (runs) | healthy after | server CPU ms per run | as expected |",
        "|---|---|---|---:|---|",
        *["| " + " | ".join(row) + " |" for row in corpus],
        "",
        f"Service log: {len(log_lines)} lines, {tracebacks} tracebacks.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    console.print(f"wrote {args.out}")
    bad = [row for row in corpus if not row[4].startswith("yes")]
    for row in bad:
        console.print(f"hostile case not as expected: {row}", markup=False)
    return 1 if server_errors or bad else 0


if __name__ == "__main__":
    sys.exit(main())
