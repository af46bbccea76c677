"""`tmequant demo`: phantom slides through the whole pipeline, biomarkers next to their truth."""

from __future__ import annotations

from pathlib import Path

import typer

from tmequant.cli._app import app, fail


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(
        Path("tmequant-demo"), "--out", "-o",
        help="Folder for the phantoms (phantoms/) and the run's outputs (cohort.csv, report.html, "
        "results/<slide>/, GeoJSON), plus demo_checks.csv and demo.json.", show_default=True,
    ),
    scenarios: str = typer.Option(
        "inflamed,excluded,desert", "--scenarios",
        help="Comma-separated phantom scenarios.", show_default=True,
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the phantoms.", show_default=True),
    model: str = typer.Option(
        "phantom-demo", "--model",
        help="Model name or folder (the bundled phantom-demo knows phantoms only).", show_default=True,
    ),
    all_rows: bool = typer.Option(
        True, "--all/--required", help="Show every compared biomarker, or the required checks only.",
    ),
    cache: bool = typer.Option(
        True, "--cache/--no-cache",
        help="Reuse phantoms written before (kept in $TMEQUANT_CACHE_DIR, else ~/.cache/tmequant, "
        "about 35 MB), only when made from the same spec, code and versions and intact.",
    ),
) -> None:
    """Write a phantom slide per scenario, run the pipeline with the demo model, and print each
    biomarker next to its truth (pass/fail). Exit 0 when every required check passes:
    phenotype and TLS count exact, TIL densities (intratumoural, stromal) within 15% (or 15
    cells/mm^2 near zero), tumour area within 10%.
    """
    from tmequant.demo import run_demo
    from tmequant.errors import TmequantError

    names = [s.strip() for s in scenarios.split(",") if s.strip()]
    try:
        res = run_demo(out, names, seed=seed, model=model, progress=None, cache=cache)
    except TmequantError as e:
        fail(str(e), e.exit_code)
    typer.echo(res.table(required_only=not all_rows))
    for f in res.failures:
        typer.echo(f"FAILED {f}", err=True)
    n_req = sum(c.required for s in res.scenarios for c in s.checks)
    n_ok = sum(c.required and c.passed for s in res.scenarios for c in s.checks)
    typer.echo(f"demo: {'PASS' if res.ok else 'FAIL'}: {n_ok}/{n_req} required checks passed on "
               f"{len(res.scenarios)} phantom(s) in {res.seconds['total_s']:.0f} s; outputs in {out} "
               f"(report: {out / 'report.html'})")
    if not res.ok:
        raise typer.Exit(1)
