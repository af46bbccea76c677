"""Convert the BRCA-M2C dots into tmequant's point-label CSV (``image,x,y,class,split,patient_id``).

BRCA-M2C (Abousamra et al., ICCV 2021; BSD-3, (c) 2022 TopoXLab) ships one label file per
image, ``labels/<image>_gt_class_coords.txt``, with rows ``Y X class`` in image pixels
(1 = lymphocyte, 2 = tumour/epithelial, 3 = stromal). The CSV keeps the data set's own
train/val split and the TCGA patient barcode (first 12 characters of the file name).

    python scripts/brca_m2c_to_points.py ../shared/testdata/brca-m2c --out brca_points.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

CLASSES = {1: "lymphocyte", 2: "tumor_cell", 3: "stromal"}


def convert(root: Path, out: Path) -> int:
    """Write ``out``; returns the number of points. Image paths are written relative to
    ``out``'s folder, as tmequant's point CSV expects."""
    splits = {}
    for split in ("train", "val"):
        f = root / f"brca_ds_{split}.txt"
        if f.exists():
            splits.update({ln.strip(): split for ln in f.read_text().splitlines() if ln.strip()})
    n = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "x", "y", "class", "split", "patient_id"])
        for img in sorted((root / "images").glob("*.png")):
            rel = Path(_relpath(img.resolve(), out.parent.resolve()))
            lab = root / "labels" / f"{img.stem}_gt_class_coords.txt"
            split, patient = splits.get(img.name, ""), img.name[:12]
            rows = [ln.split() for ln in lab.read_text().splitlines() if ln.strip()] if lab.exists() else []
            if not rows:
                w.writerow([rel.as_posix(), "", "", "", split, patient])
            for y, x, c in rows:
                # Dots are pixel indices: +0.5 puts them at the pixel centre.
                w.writerow([rel.as_posix(), float(x) + 0.5, float(y) + 0.5, CLASSES[int(c)], split, patient])
                n += 1
    return n


def _relpath(p: Path, start: Path) -> str:
    import os

    return os.path.relpath(p, start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the brca-m2c folder (images/, labels/, brca_ds_*.txt)")
    ap.add_argument("--out", type=Path, required=True, help="CSV to write")
    a = ap.parse_args()
    n = convert(a.root, a.out)
    print(f"{a.out}: {n} points")


if __name__ == "__main__":
    main()
