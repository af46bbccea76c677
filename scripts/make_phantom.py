"""Write phantom slides with their truth and print what was made and how long it took.

    python scripts/make_phantom.py OUT_DIR [--scenario inflamed excluded desert] [--seed 0]
        [--width-px W --height-px H] [--mpp 0.5] [--json timings.json]

Prints one line per phantom (size, file MB, seconds, phenotype, TLS) and, with --json,
writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from tmequant.phantom import generate_phantom, scenario_spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--scenario", nargs="+", default=["inflamed", "excluded", "desert"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width-px", type=int, default=None)
    ap.add_argument("--height-px", type=int, default=None)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    print(f"{'phantom':28s} {'size px':>13s} {'MB':>6s} {'layout s':>8s} {'render+write s':>14s} "
          f"{'truth s':>7s} {'total s':>7s}  phenotype / TLS")
    for sc in a.scenario:
        spec = scenario_spec(sc, seed=a.seed, width_px=a.width_px, height_px=a.height_px, mpp_um=a.mpp)
        t0 = time.perf_counter()
        truth = generate_phantom(spec, a.out_dir)
        wall = time.perf_counter() - t0
        mb = os.path.getsize(truth.slide_path) / 1e6
        t = truth.timings_s
        print(f"{spec.name:28s} {spec.width_px:>6d}x{spec.height_px:<6d} {mb:6.1f} {t['layout_s']:8.1f} "
              f"{t['render_write_s']:14.1f} {t['truth_s']:7.1f} {wall:7.1f}  "
              f"{truth.immune_phenotype} / {truth.tls_count}")
        rows.append({"name": spec.name, "width_px": spec.width_px, "height_px": spec.height_px,
                     "mpp_um": spec.mpp_um, "file_mb": mb, "wall_s": wall, **t,
                     "immune_phenotype": truth.immune_phenotype, "tls_count": truth.tls_count,
                     "cpu_count": os.cpu_count()})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
