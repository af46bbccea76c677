"""Train the bundled real-tissue cell detector ``brca-cells-lite0`` on BRCA-M2C (run once).

Fits on the data set's train split (80 patches), chooses the epoch and the per-class peak
thresholds on its val split (10 patches, patients disjoint from train), and writes the
model folder (safetensors + card with the BSD-3 notice, the citation, the data and the
measured validation figures). Patient-level cross-validation is scripts/bench_cells_brca.py.

    python scripts/train_brca_model.py --data ../shared/testdata/brca-m2c \
        --out tmequant/data/models/brca-cells-lite0
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from brca_m2c_to_points import convert

from tmequant.models.card import DetectorSpec, ModelCard
from tmequant.training.augment import AugmentConfig
from tmequant.training.cells import CellTrainConfig, train_cells

CITATION = ("Abousamra S, Belinsky D, Van Arnam J, et al. Multi-Class Cell Detection Using "
            "Spatial Context Representation. ICCV 2021.")
NOTICE = ("Trained on BRCA-M2C (c) 2022 TopoXLab, BSD 3-Clause licence; the notice travels "
          "with these weights. Cite: " + CITATION)


NOTICE_HEAD = ("The weights in this folder (brca-cells-lite0) were trained on the BRCA-M2C data "
               "set, which is distributed under the following licence.\n" + "Cite: " + CITATION
               + "\n\n")


def recipe(data: Path, out: Path, epochs: int, seed: int, val_images: list[str] | None = None,
           threads: int | None = None, extra: dict | None = None) -> CellTrainConfig:
    """The bundled model's training recipe (also used by the cross-validation benchmark)."""
    return CellTrainConfig(
        data=data, out=out, name="brca-cells-lite0", arch="efficientnet_lite0", pretrained=True,
        mpp_um=0.5, tile_px=224, crop_px=224, crops_per_image=2, epochs=epochs, batch_size=8,
        lr=1e-3, weight_decay=1e-4, eval_every=2, select_metric="auto", match_um=6.0,
        detector=DetectorSpec(output_stride=2, sigma_um=2.0, min_distance_um=3.0, context_px=32),
        val_images=val_images, seed=seed, threads=threads,
        # stain and scale jitter beyond the defaults: the model must carry to other scanners,
        # labs and organs than the 31 TCGA-BRCA slides it learns from
        augment=AugmentConfig(hed_sigma=0.12, hed_bias=0.02, brightness=0.08, contrast=0.15,
                              scale=0.15),
        description="Cell detector (lymphocyte, tumour cell, stromal cell) for H&E at 0.5 um/px; "
                    "tissue compartments from cell composition. " + NOTICE,
        license="BSD-3-Clause (weights derived from BRCA-M2C, (c) 2022 TopoXLab)",
        domain=["breast carcinoma H&E (TCGA-BRCA, FFPE, 0.5 um/px)"],
        training_extra={"dataset": "BRCA-M2C train split (fit) + val split (selection)",
                        "citation": CITATION, **(extra or {})},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="the brca-m2c folder")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory() as td:
        csv_path = Path(td) / "points.csv"
        convert(a.data, csv_path)
        work = Path(td) / "model"
        res = train_cells(recipe(csv_path, work, a.epochs, a.seed, threads=a.threads))
        a.out.mkdir(parents=True, exist_ok=True)
        for f in ("model.safetensors", "model.json", "metrics.json", "history.json", "split.csv"):
            shutil.copy2(work / f, a.out / f)
        lic = a.data / "LICENSE"
        if lic.exists():
            # BSD-3: the data's copyright notice and terms travel with weights derived from it
            (a.out / "NOTICE").write_text(NOTICE_HEAD + lic.read_text(encoding="utf-8"), encoding="utf-8")
    # The card names the data, not this machine's temporary paths.
    card = ModelCard.load(a.out)
    card.training = {**card.training, "data": "BRCA-M2C: 80 train-split patches (fit), 10 "
                     "val-split patches (checkpoint and thresholds)"}
    card.save(a.out)
    v = res.metrics["val"]
    print(f"{a.out}: best epoch {res.best_epoch}, {res.seconds:.0f} s")
    for c in [*res.card.cell_classes, "detection"]:
        m = v[c]
        print(f"  {c:12s} P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f} "
              f"count r {m['count_pearson_per_image']:.3f}")


if __name__ == "__main__":
    main()
