"""Demonstration: train a cell-count head on real H&E, evaluate on held-out pixels.

Data: ``histolytics/hgsc_nest.jpg`` (1500 x 1500 px H&E crop of a high-grade serous ovarian
carcinoma) and its nucleus instance/type masks from the ``histolytics`` wheel. The labels
are the output of a panoptic SEGMENTATION MODEL on ONE image, not manual ground truth; the
pixel size is not stated by the source and is ASSUMED to be 0.5 um/px.

Task: inflammatory / other nuclei per 112 um tile (224 px at the assumed 0.5 um/px; a
nucleus counts where its centroid lies). Train on tiles of the left half (x < 750 px),
evaluate on tiles of the right half (x >= 750 px): no training pixel is ever evaluated.
Baseline for context: predicting the training mean count for every tile.

    python scripts/demo_count_head_histolytics.py [--epochs 6] [--out demo_count_head.json]

Prints a table and writes JSON. Runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "testdata" / "histolytics"
TILE_IMAGE_PX = 224  # 112 um at the assumed 0.5 um/px
ASSUMED_MPP_UM = 0.5


def nuclei_table(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(centroids (N, 2) x, y px, type id (N,), type id -> class name).

    The type-id meaning is not stored in the npz; it is found by matching the GeoParquet
    polygons (with ``class_name``) beside it to the type mask at their centroids.
    """
    import pandas as pd
    import shapely
    from scipy import ndimage

    inst = np.load(folder / "hgsc_nest_inst_mask.npz")["nuc_raster"]
    typ = np.load(folder / "hgsc_nest_type_mask.npz")["nuc_raster"]
    ids = np.unique(inst)
    ids = ids[ids > 0]
    cy_cx = np.array(ndimage.center_of_mass(np.ones_like(inst), inst, ids))
    # an instance's type: the most frequent non-zero type id under it
    n_t = int(typ.max()) + 1
    pair = np.bincount(
        (inst.astype(np.int64) * n_t + typ).ravel(), minlength=(int(inst.max()) + 1) * n_t
    ).reshape(-1, n_t)
    pair[:, 0] = 0
    types = np.where(pair[ids].sum(1) > 0, pair[ids].argmax(1), 0)
    df = pd.read_parquet(folder / "hgsc_nest.parquet")
    geoms = shapely.from_wkb(df["geometry"].to_numpy())
    c = shapely.centroid(geoms)
    xs = np.clip(np.round(shapely.get_x(c)).astype(int), 0, typ.shape[1] - 1)
    ys = np.clip(np.round(shapely.get_y(c)).astype(int), 0, typ.shape[0] - 1)
    names: dict[int, str] = {}
    for name in sorted(df["class_name"].unique()):
        v = typ[ys[df["class_name"].to_numpy() == name], xs[df["class_name"].to_numpy() == name]]
        v = v[v > 0]
        names[int(np.bincount(v).argmax())] = str(name)
    keep = types > 0
    return cy_cx[keep][:, ::-1], types[keep], names


def tile_samples(
    image: Path,
    x_range: tuple[int, int],
    height: int,
    stride: int,
    centroids: np.ndarray,
    is_inflam: np.ndarray,
    slide_id: str,
):
    """Samples of kind ``image``: boxes of TILE_IMAGE_PX inside [x_range) with their counts."""
    from tmequant.training import Sample

    out = []
    x0, x1 = x_range
    for y in range(0, height - TILE_IMAGE_PX + 1, stride):
        for x in range(x0, x1 - TILE_IMAGE_PX + 1, stride):
            inside = (
                (centroids[:, 0] >= x)
                & (centroids[:, 0] < x + TILE_IMAGE_PX)
                & (centroids[:, 1] >= y)
                & (centroids[:, 1] < y + TILE_IMAGE_PX)
            )
            n_inf = float((inside & is_inflam).sum())
            n_oth = float((inside & ~is_inflam).sum())
            out.append(
                Sample(
                    path=str(image),
                    label=None,
                    slide_id=slide_id,
                    kind="image",
                    box=(float(x), float(y), float(TILE_IMAGE_PX)),
                    counts=(n_inf, n_oth),
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--stride-px", type=int, default=48, help="training tile stride (overlapping)")
    ap.add_argument(
        "--eval-stride-px", type=int, default=56, help="dense (overlapping) eval stride"
    )
    ap.add_argument(
        "--model-tile-px",
        type=int,
        default=112,
        help="network input side; 112 px over 112 um = 1 um/px",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steady on a shared 2-core machine, where 2 thrash)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-out", type=Path, default=None, help="keep the model folder here")
    ap.add_argument("--out", type=Path, default=Path("demo_count_head.json"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from tmequant.training import LabelSet, TrainConfig, evaluate, train
    from tmequant.training.augment import AugmentConfig

    image = args.data / "hgsc_nest.jpg"
    if not image.is_file():
        print(
            f"{image}: not found (set --data to the histolytics test-data folder)", file=sys.stderr
        )
        return 2
    t0 = time.perf_counter()
    centroids, types, names = nuclei_table(args.data)
    inflam_id = next(k for k, v in names.items() if v == "inflammatory")
    is_inflam = types == inflam_id
    h = w = 1500
    half = w // 2
    classes = ["inflammatory", "other"]
    roles = {"inflammatory": "lymphocyte", "other": "other"}

    def labelset(samples, source):
        return LabelSet(samples=samples, cell_classes=classes, cell_roles=roles, source=source)

    train_set = labelset(
        tile_samples(image, (0, half), h, args.stride_px, centroids, is_inflam, "hgsc_nest_left"),
        f"{image} left half",
    )
    test_sets = {
        "right_half_non_overlapping": labelset(
            tile_samples(
                image, (half, w), h, TILE_IMAGE_PX, centroids, is_inflam, "hgsc_nest_right"
            ),
            f"{image} right half",
        ),
        "right_half_dense": labelset(
            tile_samples(
                image, (half, w), h, args.eval_stride_px, centroids, is_inflam, "hgsc_nest_right"
            ),
            f"{image} right half",
        ),
    }
    mpp = ASSUMED_MPP_UM * TILE_IMAGE_PX / args.model_tile_px
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.model_out or Path(tmp) / "hgsc-count-head"
        res = train(
            TrainConfig(
                data=train_set,
                out=out_dir,
                arch="efficientnet_lite0",
                pretrained=True,
                tile_px=args.model_tile_px,
                mpp_um=mpp,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                val_fraction=0.0,
                augment=AugmentConfig(scale=0.0),
                seed=args.seed,
                count_loss="poisson",
                progress=False,
                eval_train_max=0,
                description="Demo count head: inflammatory/other nuclei per 112 um tile, "
                "trained on the left half of histolytics hgsc_nest.jpg (segmentation-model labels)",
            )
        )
        results = {}
        for key, ls in test_sets.items():
            ev = evaluate(ls, out_dir, device="cpu", progress=False)
            true = np.array([s.counts for s in ls.samples])
            base = np.array([s.counts for s in train_set.samples]).mean(axis=0)
            results[key] = {
                "n_tiles": len(ls),
                **{
                    c: {
                        **ev.metrics["counts"][c],
                        "baseline_mae_per_tile": float(np.abs(true[:, j] - base[j]).mean()),
                    }
                    for j, c in enumerate(classes)
                },
            }
    wall = time.perf_counter() - t0
    report = {
        "data": str(image),
        "labels": "histolytics panoptic segmentation model output, one image",
        "assumed_mpp_um": ASSUMED_MPP_UM,
        "tile_um": TILE_IMAGE_PX * ASSUMED_MPP_UM,
        "model_input": {"tile_px": args.model_tile_px, "mpp_um": mpp},
        "type_ids": names,
        "n_nuclei": {"inflammatory": int(is_inflam.sum()), "other": int((~is_inflam).sum())},
        "train": {
            "tiles": len(train_set),
            "stride_px": args.stride_px,
            "epochs": args.epochs,
            "steps": res.steps,
            "final_train_loss": res.history[-1]["train_loss"],
        },
        "eval": results,
        "threads": args.threads,
        "seed": args.seed,
        "torch": torch.__version__,
        "wall_s": round(wall, 1),
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"type ids: {names}; nuclei {report['n_nuclei']}; train tiles {len(train_set)} "
        f"(left half, stride {args.stride_px} px), {res.steps} steps, {wall:.0f} s"
    )
    print(
        f"{'eval set':28s} {'class':13s} {'tiles':>5s} {'mean true':>9s} {'MAE':>6s} "
        f"{'base MAE':>8s} {'Pearson':>7s} {'Spearman':>8s}"
    )
    for key, r in results.items():
        for c in classes:
            m = r[c]
            print(
                f"{key:28s} {c:13s} {m['n_tiles']:5d} {m['mean_true_per_tile']:9.2f} "
                f"{m['mae_per_tile']:6.2f} {m['baseline_mae_per_tile']:8.2f} "
                f"{m['pearson_per_tile']:7.3f} {m['spearman_per_tile']:8.3f}"
            )
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
