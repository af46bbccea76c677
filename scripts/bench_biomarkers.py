"""Benchmark: compute_biomarkers on a 200,000-tile grid and with a 600,000-cell table.

    python scripts/bench_biomarkers.py [--tiles 200000] [--cells 600000] [--repeat 3] [--json out.json]

Synthetic slide: blocky tumour nests in stroma with lymphoid aggregates, Poisson counts.
Prints a table (best of --repeat, seconds) and writes JSON; ratios are against the
grid-only path.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd


def synthetic(n_tiles: int, n_cells: int, seed: int = 0):
    from tmequant.biomarkers import TileGrid

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_tiles)))
    rr, cc = [a.ravel()[:n_tiles] for a in np.mgrid[0:side, 0:side]]
    coarse = rng.random((side // 8 + 1, side // 8 + 1)) < 0.45
    tumour = np.kron(coarse, np.ones((8, 8), bool))[rr, cc]
    immune = rng.random(n_tiles) < 0.03
    p_t = np.where(tumour, 0.85, 0.05)
    p_i = np.where(immune, 0.7, 0.02)
    p_s = np.clip(1 - p_t - p_i, 0, 1)
    lymph = rng.poisson(np.where(immune, 60, np.where(tumour, 2, 6))).astype(float)
    grid = TileGrid(rows=rr, cols=cc, tile_um=112.0, slide_mpp_um=0.25,
                    role_probs={"tumor": p_t, "stroma": p_s, "immune": p_i},
                    tissue_fraction=rng.uniform(0.5, 1, n_tiles), lymphocyte_counts=lymph,
                    tumor_cell_counts=rng.poisson(np.where(tumour, 40, 1)).astype(float), count_source="model")
    s = grid.tile_level0_px
    t = rng.integers(0, n_tiles, n_cells)
    cells = pd.DataFrame({"x": (cc[t] + rng.random(n_cells)) * s, "y": (rr[t] + rng.random(n_cells)) * s,
                          "class": rng.choice(["Lymphocyte", "Tumor", "Stroma", "Plasma cell"], n_cells)})
    return grid, cells


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=200_000)
    ap.add_argument("--cells", type=int, default=600_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("bench_biomarkers.json"))
    a = ap.parse_args()

    from tmequant.biomarkers import BiomarkerParams, cell_roles, compute_biomarkers, read_cell_table

    grid, cells = synthetic(a.tiles, a.cells)
    tmp = Path("bench_cells.parquet")
    cells.to_parquet(tmp)
    rows = {
        "grid only (model counts)": best_of(lambda: compute_biomarkers(grid), a.repeat),
        "grid + cell table (in memory)": best_of(lambda: compute_biomarkers(grid, cells=cells), a.repeat),
        "  same, tile compartments only": best_of(lambda: compute_biomarkers(
            grid, cells=cells, params=BiomarkerParams(cell_compartments=False)), a.repeat),
        "cell roles only": best_of(lambda: cell_roles(cells["class"]), a.repeat),
        "read_cell_table (parquet x,y)": best_of(lambda: read_cell_table(tmp), a.repeat),
    }
    tmp.unlink()
    base = rows["grid only (model counts)"]
    print(f"{'step':34s} {'seconds':>8s} {'vs grid':>8s}   ({a.tiles:,} tiles, {a.cells:,} cells)")
    for k, v in rows.items():
        print(f"{k:34s} {v:8.3f} {v / base:8.2f}")
    res = compute_biomarkers(grid)
    out = {"tiles": a.tiles, "cells": a.cells, "repeat": a.repeat, "seconds": rows,
           "ratio_vs_grid": {k: v / base for k, v in rows.items()},
           "tiles_per_s": a.tiles / base, "cells_per_s_extra": a.cells / max(rows["grid + cell table (in memory)"] - base, 1e-9),
           "check": {k: res.row[k] for k in ("bulk_area_mm2", "til_density_stromal_per_mm2", "tls_count")},
           "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}}
    a.json.write_text(json.dumps(out, indent=2, default=float))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
