"""Peak memory of the bad and large inputs of docs/reliability.md ("Silently wrong results").

    python scripts/rss_bad_inputs.py make DIR            # writes the inputs (~3 GB of disk, minutes)
    /usr/bin/time -v python scripts/rss_bad_inputs.py CASE DIR   # one case; read "Maximum resident"

CASE: geojson1m, geojson1m_compute, bomb_geojson, many_csv, truncated_geojson, truncated_csv,
micrometres, nan, strip_zlib, strip_raw, manifest_mpp, symlink_loop, cells_<N> (N cells in
memory through compute_biomarkers: the per-cell slope).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def make(d: Path) -> None:
    import tifffile

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = ["Tumor", "Lymphocyte", "Stroma"]
    with open(d / "cells1m.geojson", "w") as f:  # 1M polygon cells, ~330 MB
        f.write('{"type":"FeatureCollection","features":[')
        for i, (x, y) in enumerate(rng.uniform(0, 40000, (1_000_000, 2))):
            a = np.linspace(0, 2 * np.pi, 9)
            ring = [[round(x + 4 * np.cos(t), 2), round(y + 4 * np.sin(t), 2)] for t in a]
            ring[-1] = ring[0]
            f.write(("," if i else "") + json.dumps({
                "type": "Feature", "id": f"{i:08x}", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "detection", "classification": {"name": names[i % 3]}}},
                separators=(",", ":")))
        f.write("]}")
    with gzip.open(d / "bomb.geojson.gz", "wb", compresslevel=9) as g:  # 2.1 GiB of text
        g.write(b'{"type":"FeatureCollection","features":[')
        for _ in range(34):
            g.write(b" " * (64 << 20))
        g.write(b"]}")
    with gzip.open(d / "many.csv.gz", "wb", compresslevel=1) as g:  # 30M rows
        g.write(b"x,y,class\n")
        for _ in range(30):
            g.write(b"1.5,2.5,Tumor\n" * (1 << 20))
    pts = rng.uniform(0, 1e4, (20000, 2))
    for name, text in (("t.csv.gz", "x,y,class\n" + "".join(f"{x:.3f},{y:.3f},Tumor\n" for x, y in pts)),
                       ("t.geojson.gz", json.dumps({"type": "FeatureCollection", "features": [
                           {"type": "Feature", "geometry": {"type": "Point", "coordinates": list(p)},
                            "properties": {}} for p in pts]}))):
        data = gzip.compress(text.encode())
        (d / name).write_bytes(data[: len(data) // 2])
    img = rng.integers(0, 255, (6000, 6000, 3), dtype=np.uint8)
    kw = {"rowsperstrip": 6000, "photometric": "rgb", "resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(d / "strip_raw.tif", img, **kw)
    tifffile.imwrite(d / "strip_zlib.tif", img, compression="zlib", **kw)
    (d / "m.csv").write_text(f"slide_id,path,mpp\na,{d / 'strip_raw.tif'},1_0\n")
    loop = d / "loop.csv"
    if not loop.is_symlink():
        loop.symlink_to(loop)


def _grid(mpp: float, tissue_from: int = 0):
    from tmequant.biomarkers import TileGrid

    rr, cc = [a.ravel() for a in np.mgrid[0:100, 0:100]]
    tum = (rr > 20) & (rr < 80) & (cc > 20) & (cc < 80)
    tissue = (rr >= tissue_from) & (cc >= tissue_from)
    return TileGrid.from_table(pd.DataFrame({
        "row": rr, "col": cc, "tumor": tum * 1.0, "stroma": (~tum) * 1.0, "immune": 0.0,
        "background": 0.0, "tissue_fraction": tissue * 1.0}), tile_um=112.0, slide_mpp_um=mpp)


def case(name: str, d: Path) -> str:
    from tmequant.biomarkers import TileGrid, compute_biomarkers
    from tmequant.biomarkers.cells import read_cell_table

    files = {"geojson1m": "cells1m.geojson", "bomb_geojson": "bomb.geojson.gz", "many_csv": "many.csv.gz",
             "truncated_geojson": "t.geojson.gz", "truncated_csv": "t.csv.gz", "symlink_loop": "loop.csv"}
    if name in files:
        return f"{len(read_cell_table(d / files[name]))} cells"
    if name == "geojson1m_compute":
        return str(compute_biomarkers(_grid(0.25), cells=read_cell_table(d / "cells1m.geojson")).row["n_cells"])
    if name == "micrometres":
        px = np.random.default_rng(0).uniform(50 * 448, 100 * 448, (1_000_000, 2))
        cells = pd.DataFrame({"x": px[:, 0] * 0.25, "y": px[:, 1] * 0.25, "class": "Lymphocyte"})
        return str(compute_biomarkers(_grid(0.25, tissue_from=50), cells=cells).row["n_cells"])
    if name == "nan":
        rr, cc = [a.ravel() for a in np.mgrid[0:300, 0:300]]
        g = TileGrid.from_table(pd.DataFrame({"row": rr, "col": cc, "tumor": np.nan, "stroma": np.nan,
                                "immune": np.nan, "background": np.nan}), tile_um=112.0, slide_mpp_um=0.25)
        return str(compute_biomarkers(g).row)
    if name.startswith("strip_"):
        from tmequant.wsi import open_slide

        with open_slide(d / f"{name}.tif") as s:
            return str(s.read_region((100, 100), 0, (512, 512)).shape)
    if name == "manifest_mpp":
        from tmequant.inputs import expand_slides

        return str(expand_slides([d / "m.csv"]))
    if name.startswith("cells_"):
        n = int(name.split("_")[1])
        rng = np.random.default_rng(0)
        xy = rng.uniform(0, 44800, (n, 2))
        cls = pd.Categorical.from_codes(rng.integers(0, 3, n), ["Tumor", "Lymphocyte", "Stroma"])
        df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "class": np.asarray(cls, dtype=object)})
        del xy
        return str(compute_biomarkers(_grid(0.25), cells=df).row["n_cells"])
    raise SystemExit(f"unknown case {name!r}")


if __name__ == "__main__":
    from tmequant.errors import TmequantError

    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        try:
            print("ok:", case(sys.argv[1], Path(sys.argv[2]))[:200])
        except TmequantError as e:
            print("error:", e)
