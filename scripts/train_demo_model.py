"""Train the bundled ``phantom-demo`` model (``tmequant/data/models/phantom-demo/``), reproducibly.

The model knows synthetic phantoms only. Its training tiles are cut exactly as the pipeline
cuts them: each training phantom is written as an SVS by ``tmequant.phantom.generate_phantom``
and tiled by ``tmequant.tiling.tile_slide`` at the demo geometry (112 px at 1.0 um/px, the
112 um grid the truth is computed on); every stored tile gets

* a tissue label drawn from the truth label map's class fractions in that tile (pure tiles
  always get their class; a tile that is 60% tumour is labelled TUM with probability 0.6),
  so that the softmax learns the class *fractions* the truth uses for areas; the held-out
  (``test``) phantom gets the plain majority class instead, so its metrics are ordinary
  accuracies. Every tile is kept, so classes have their natural frequencies: capping the
  stroma tiles (an earlier version) biased mixed tiles towards tumour (tumour area +9-11%
  on phantoms of other seeds). There is no validation split: the last epoch of the cosine
  schedule is kept.

Lymphocytes are counted by the weight-free nucleus counter (``tmequant.demo.DEMO_COUNTER``
settings at 1.0 um/px): within a few % of the truth per tile class on phantoms. A count head
(``--count-head``: Poisson loss on the truth lymphocytes per tile) trained jointly from
scratch on this budget swamped the tissue head (tumour area +70% after four epochs).

Then ``tmequant.training.train`` trains timm's ``mobilenetv2_035`` (0.40 M parameters,
random init: phantoms need no ImageNet features, and a small network keeps the demo fast on
two CPU cores) with a fixed seed on the CPU, and the best checkpoint is stored as float16
tensors (the loader casts them back to float32) next to its card.

    python scripts/train_demo_model.py                 # writes tmequant/data/models/phantom-demo
    python scripts/train_demo_model.py --out /tmp/pd --work /tmp/pd-work --epochs 1

Prints the card's metrics and writes ``<work>/train/metrics.json`` and plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tmequant.phantom import (
    CLASS_NAMES,
    CLASS_ROLES,
    generate_phantom,
    scenario_spec,
    training_specs,
)

NAME = "phantom-demo"
ARCH = "mobilenetv2_035"  # 0.40 M parameters: ~4.5x the tiles/s of efficientnet_lite0 on a CPU
TILE_PX = 112
MPP_UM = 1.0
DESCRIPTION = (
    "phantom-demo: a small CNN (timm mobilenetv2_035, random init) trained ONLY on "
    "synthetic tmequant phantom slides "
    "(tmequant.phantom: rendered H&E-like tumour nests, stroma, lymphocytes, lymphoid "
    "aggregates, necrosis, fat) at 112 px / 1.0 um per px, with a lymphocyte count head. It "
    "knows phantoms only: its output on real H&E means nothing. It exists so that "
    "`tmequant demo` runs the whole pipeline on slides whose truth is known; for real slides "
    "train a model with `tmequant train`. Reproduce with scripts/train_demo_model.py."
)


DESCRIPTION_NO_COUNT = (
    "phantom-demo: a small CNN (timm mobilenetv2_035, random init) trained ONLY on synthetic "
    "tmequant phantom slides (tmequant.phantom: rendered H&E-like tumour nests, stroma, "
    "lymphocytes, lymphoid aggregates, necrosis, fat) at 112 px / 1.0 um per px; tissue classes "
    "only (lymphocytes are counted by the nucleus counter). It knows phantoms only: its output on "
    "real H&E means nothing. It exists so that `tmequant demo` runs the whole pipeline on slides "
    "whose truth is known; for real slides train a model with `tmequant train`. Reproduce with "
    "scripts/train_demo_model.py."
)


def phantom_specs(seed: int) -> tuple[list, list]:
    """Training and validation phantoms (none shares a seed with the demo's seed-0 slides).

    Training: ``training_specs`` (TLS- and necrosis-rich variants of the three presets) plus
    an ``inflamed`` preset; validation: one ``excluded`` preset.
    """
    base = 1000 + 10 * seed
    train = list(training_specs(base))
    train.append(scenario_spec("inflamed", seed=base + 3).replace(name=f"phantom-train-inflamed-s{base + 3}"))
    val = [scenario_spec("excluded", seed=base + 7).replace(name=f"phantom-val-excluded-s{base + 7}")]
    return train, val


def tile_labels(truth_dir: Path, grid_rc: np.ndarray, tile_level0_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, n_classes) class fractions and (N,) truth lymphocyte counts of the store's tiles."""
    lab = np.load(truth_dir / "labels.npz")
    labels, ds = lab["labels"], int(lab["downsample"])
    k = tile_level0_px / ds  # label pixels per tile side
    if abs(k - round(k)) > 1e-6:
        raise ValueError(f"tile side {tile_level0_px} px is not a whole number of label pixels ({ds})")
    k = round(k)
    fr = np.zeros((len(grid_rc), len(CLASS_NAMES)), np.float64)
    for i, (r, c) in enumerate(grid_rc):
        block = labels[r * k:(r + 1) * k, c * k:(c + 1) * k]
        n = np.bincount(block.ravel(), minlength=len(CLASS_NAMES)).astype(np.float64)
        n[0] += k * k - block.size  # outside the label map: background
        fr[i] = n / (k * k)
    cells = pd.read_parquet(truth_dir / "cells.parquet")
    lym = cells[cells["class"] == "lymphocyte"]
    r = np.floor(lym["y"].to_numpy() / tile_level0_px).astype(np.int64)
    c = np.floor(lym["x"].to_numpy() / tile_level0_px).astype(np.int64)
    index = {(int(a), int(b)): i for i, (a, b) in enumerate(grid_rc)}
    counts = np.zeros(len(grid_rc), np.float64)
    for a, b in zip(r.tolist(), c.tolist()):
        i = index.get((a, b))
        if i is not None:
            counts[i] += 1
    return fr, counts


def build_labels(work: Path, seed: int = 0, max_per_class: int = 0, count_head: bool = False,
                 progress: bool = False):
    """Write the phantoms, tile them, keep every tile (or up to ``max_per_class`` > 0 tiles of
    each majority class per phantom, a seeded random subset), save them as PNG plus
    ``tiles.csv``; returns a LabelSet (with lymphocyte counts per tile when ``count_head``).

    Training phantoms are split ``train``, the held-out one ``test``."""
    from PIL import Image

    from tmequant.tiling import tile_slide
    from tmequant.tiling.store import SlideStore
    from tmequant.tiling.tile import TilingParams
    from tmequant.training import LabelSet, Sample

    train_specs, val_specs = phantom_specs(seed)
    rng = np.random.default_rng([seed, 17])
    samples: list = []
    rows: list = []
    params = TilingParams(target_mpp_um=MPP_UM, tile_px=TILE_PX)
    for split, specs in (("train", train_specs), ("test", val_specs)):
        for spec in specs:
            truth = generate_phantom(spec, work / "slides")
            res = tile_slide(truth.slide_path, work / "stores", params, progress=progress, qc_png=False)
            store = SlideStore(res.store_path)
            grid = store.grid
            fr, counts = tile_labels(truth.truth_dir, grid, store.tile_level0_px)
            major = fr.argmax(1)
            keep = np.zeros(len(fr), bool)
            for c in range(len(CLASS_NAMES)):
                idx = np.flatnonzero(major == c)
                if 0 < max_per_class < idx.size:
                    idx = rng.choice(idx, max_per_class, replace=False)
                keep[idx] = True
            images = np.asarray(store.images[...])
            tdir = work / "tiles" / spec.name
            tdir.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(keep).tolist():
                rc, f = grid[i], fr[i]
                if split == "train":
                    label = CLASS_NAMES[int(rng.choice(len(CLASS_NAMES), p=f / f.sum()))]
                else:
                    label = CLASS_NAMES[int(np.argmax(f))]
                path = tdir / f"r{rc[0]}_c{rc[1]}.png"
                Image.fromarray(images[i]).save(path)
                samples.append(Sample(path=str(path), label=label, slide_id=spec.name,
                                      counts=(float(counts[i]),) if count_head else None,
                                      split=split))
                rows.append((str(path), label, spec.name, split, float(counts[i]), *f.round(4)))
            logging.getLogger("tmequant").info("%s: %d of %d tiles (%s)", spec.name, int(keep.sum()),
                                               len(fr), split)
    pd.DataFrame(rows, columns=["path", "label", "slide_id", "split", "lymphocyte_count",
                                *[f"frac_{c}" for c in CLASS_NAMES]]).to_csv(work / "tiles.csv", index=False)
    cells = ["lymphocyte"] if count_head else []
    return LabelSet(samples=samples, tissue_classes=list(CLASS_NAMES), cell_classes=cells,
                    tissue_roles=dict(CLASS_ROLES), cell_roles={c: c for c in cells},
                    source=f"tmequant phantoms (scripts/train_demo_model.py --seed {seed}): "
                           + ", ".join(s.name for s in train_specs + val_specs))


def to_fp16(folder: Path) -> None:
    """Rewrite ``model.safetensors`` with float16 floating tensors (half the bytes)."""
    from safetensors.torch import load_file, save_file

    p = folder / "model.safetensors"
    t = load_file(str(p))
    t = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in t.items()}
    save_file(t, str(p), metadata={"format": "pt", "tmequant_model": NAME, "dtype": "float16"})


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=root / "tmequant" / "data" / "models" / NAME)
    ap.add_argument("--work", type=Path, default=Path("phantom-demo-work"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default=ARCH)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-per-class", type=int, default=0, help="0: every tile")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--count-head", action="store_true",
                    help="also train a lymphocyte count head (default: tissue classes only; the demo "
                    "counts lymphocytes with the nucleus counter)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from tmequant.training import AugmentConfig, TrainConfig, train

    torch.set_num_threads(args.threads)
    t0 = time.time()
    labels = build_labels(args.work, args.seed, args.max_per_class, args.count_head)
    t1 = time.time()
    tdir = args.work / "train"
    if tdir.exists():
        shutil.rmtree(tdir)
    cfg = TrainConfig(
        data=labels, out=tdir, name=NAME, arch=args.arch, pretrained=args.arch == "efficientnet_lite0",
        tile_px=TILE_PX, mpp_um=MPP_UM, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, device="cpu", patience=0, count_loss="poisson", val_fraction=0.0,
        augment=AugmentConfig(scale=0.0), select_metric="val_loss" if args.count_head else "auto",
        description=DESCRIPTION if args.count_head else DESCRIPTION_NO_COUNT,
        progress=False,
    )
    res = train(cfg)
    t2 = time.time()
    card = res.card
    card.license = "Apache-2.0 (weights trained on synthetic phantoms only)"
    card.version = "1.0.0"
    card.training = dict(card.training, data_build_s=round(t1 - t0, 1), train_s=round(t2 - t1, 1),
                         script="scripts/train_demo_model.py", seed=args.seed,
                         weights_dtype="float16", knows="tmequant phantoms only")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tdir / "model.safetensors", args.out / "model.safetensors")
    to_fp16(args.out)
    card.save(args.out / "model.json")
    size = (args.out / "model.safetensors").stat().st_size
    print(json.dumps({"out": str(args.out), "weights_bytes": size, "metrics": card.metrics,
                      "data_build_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
