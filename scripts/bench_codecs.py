"""Which codec stores tile pixels: bytes, fidelity and model outputs against lossless.

For every candidate (lossless blosc-lz4, JPEG, JPEG XL, AVIF at several levels):

- **bytes per tile** and **bytes per mm^2 of tissue** in a real store (the slide's tiles at
  0.5 um/px, 224 px, tiled through ``tile_slide`` with that ``compression``), against the
  source slide file's bytes per mm^2 of its own tissue;
- **PSNR** of the stored tiles against the lossless tiles (all pixels, and the worst tile);
- **encode / decode ms per tile** (one thread, imagecodecs);
- **model outputs**: the bundled cell detector (``DEFAULT_MODEL``) and the phantom-demo tile
  classifier run through ``predict_store`` on each store: per-slide cell counts per class
  (relative difference to lossless) and tissue probabilities (max |diff| over tiles);
- **BRCA-M2C**: the detector on each of the 90 human-dotted patches, original PNG against
  its encode/decode round trip (whole patch), summed counts per class and the lymphocyte F1
  against the human dots, so a codec that keeps counts but moves cells shows.

The pass rule of issue 17: <= 1/4 of the lossless bytes per tile, PSNR >= 40 dB, tissue
probability max |diff| <= 0.02 and per-slide counts within 1%.

    python scripts/bench_codecs.py --json bench_codecs.json [--codecs jpeg-95 jpegxl-90 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tmequant.codecs import decode_image, encode_image, parse_image_codec  # noqa: E402
from tmequant.domain import DEFAULT_MODEL  # noqa: E402
from tmequant.inference.engine import predict_store  # noqa: E402
from tmequant.models import load_model  # noqa: E402
from tmequant.store import SlideStore  # noqa: E402
from tmequant.tiling import TilingParams, tile_slide  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "testdata"
DEFAULT_CODECS = ["jpeg-95", "jpeg-98", "jpegxl-95", "avif-95"]
# (slide, mpp override): the TCGA frozen section has no MPP (about 1 um/px, see its README)
SLIDES = [("slides/CMU-1-Small-Region.svs", None), ("slides/TCGA-CR-7395-01A-01-TS1.svs", 1.0)]
LOSSLESS = "blosc-lz4"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def stored_bytes(store: str) -> int:
    return sum(f.stat().st_size for f in (Path(store) / "tiles" / "images").rglob("*") if f.is_file())


def slide_rows(codecs: list[str], work: Path, models: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for rel, mpp in SLIDES:
        src = SHARED / rel
        ref: dict[str, Any] = {}
        for comp in [LOSSLESS, *codecs]:
            out = work / f"{src.stem}-{comp}"
            r = tile_slide(src, out, TilingParams(compression=comp), mpp_override_um=mpp,
                           progress=False)
            st = SlideStore(r.store_path)
            tiles = st.images[:]
            tissue_mm2 = _slide_tissue_mm2(st)
            row: dict[str, Any] = {"slide": src.name, "compression": comp, "n_tiles": r.n_tiles,
                                   "bytes_per_tile": stored_bytes(r.store_path) / max(r.n_tiles, 1),
                                   "tissue_mm2": tissue_mm2,
                                   "source_bytes_per_mm2": src.stat().st_size / tissue_mm2}
            row["bytes_per_mm2"] = stored_bytes(r.store_path) / tissue_mm2
            for name, m in models.items():
                # allow_mismatch: phantom-demo wants 112 px at 1 um; here only its stability counts
                predict_store(r.store_path, m, device="cpu", progress=False, overwrite=True,
                              allow_mismatch=True)
                st = SlideStore(r.store_path)
                probs = st.tissue_probs(m.card.name).astype(np.float64)
                counts = (st.read_cells(m.card.name)["class"].value_counts().to_dict()
                          if st.has_cells(m.card.name) else {})
                row[f"{name}_probs"] = probs
                row[f"{name}_counts"] = {str(k): int(v) for k, v in counts.items()}
            if comp == LOSSLESS:
                ref = {"tiles": tiles, **row}
            else:
                row["psnr_db"] = psnr(tiles, ref["tiles"])
                row["psnr_worst_tile_db"] = min(psnr(a, b) for a, b in zip(tiles, ref["tiles"]))
                row["bytes_ratio"] = row["bytes_per_tile"] / ref["bytes_per_tile"]
                for name in models:
                    row[f"{name}_probs_max_abs_diff"] = float(np.max(np.abs(
                        row[f"{name}_probs"] - ref[f"{name}_probs"]))) if len(tiles) else 0.0
                    rc, cc = ref[f"{name}_counts"], row[f"{name}_counts"]
                    row[f"{name}_count_rel_diff"] = {
                        k: (cc.get(k, 0) - rc[k]) / rc[k] for k in rc if rc[k]}
            for name in models:
                row.pop(f"{name}_probs")
            rows.append(row)
            print(f"  {src.name} {comp}: {row['bytes_per_tile'] / 1024:.1f} KB/tile "
                  f"psnr {row.get('psnr_db', float('inf')):.1f}", flush=True)
    return rows


def _slide_tissue_mm2(st: SlideStore) -> float:
    """Tissue area of a store's kept tiles, mm^2 (at least 1e-9: no division by zero)."""
    return max(float(np.sum(st.tissue_fraction)) * (st.tile_um / 1000) ** 2, 1e-9)


def speed_rows(codecs: list[str], tiles: np.ndarray) -> dict[str, dict[str, float]]:
    """ms per 224 px tile to encode and decode, one thread."""
    out = {}
    for comp in codecs:
        codec, level = parse_image_codec(comp)
        t0 = time.perf_counter()
        enc = [encode_image(t, codec, level) for t in tiles]
        t1 = time.perf_counter()
        for d in enc:
            decode_image(d, codec)
        t2 = time.perf_counter()
        out[comp] = {"encode_ms": (t1 - t0) / len(tiles) * 1e3, "decode_ms": (t2 - t1) / len(tiles) * 1e3}
    return out


def brca_rows(codecs: list[str], model: Any) -> dict[str, Any]:
    from bench_cells_brca import CLASSES, MATCH_UM, MPP_UM, _truth
    from brca_m2c_to_points import convert

    from tmequant.inference.cells import detect_image
    from tmequant.training.dataset import read_image
    from tmequant.training.metrics import detection_metrics
    from tmequant.training.points import load_points

    with tempfile.TemporaryDirectory() as d:
        csv_path = Path(d) / "points.csv"
        convert(SHARED / "brca-m2c", csv_path)
        ps = load_points(csv_path, CLASSES)
        truth = _truth(ps)
        imgs = [read_image(im.path) for im in ps.images]
        pos = {c: i for i, c in enumerate(model.card.cell_classes)}
        res: dict[str, Any] = {}
        for comp in ["lossless", *codecs]:
            preds, counts = [], dict.fromkeys(model.card.cell_classes, 0)
            worst = float("inf")
            for rgb in imgs:
                x = rgb
                if comp != "lossless":
                    codec, level = parse_image_codec(comp)
                    x = decode_image(encode_image(np.ascontiguousarray(rgb), codec, level), codec)
                    worst = min(worst, psnr(x, rgb))
                df = detect_image(model, x, MPP_UM)
                for c, n in df["class"].value_counts().items():
                    counts[str(c)] += int(n)
                preds.append((df[["x", "y"]].to_numpy(), df["class"].map(pos).to_numpy(dtype=np.int64)))
            m = detection_metrics(preds, truth, CLASSES, MATCH_UM / MPP_UM)
            res[comp] = {"counts": counts, "lymphocyte_f1": m["lymphocyte"]["f1"],
                         "psnr_worst_image_db": worst}
            print(f"  brca {comp}: {counts}", flush=True)
        ref = res["lossless"]["counts"]
        for comp in codecs:
            res[comp]["count_rel_diff"] = {k: (res[comp]["counts"][k] - ref[k]) / ref[k] for k in ref if ref[k]}
    return res


def verdict(comp: str, slides: list[dict[str, Any]], brca: dict[str, Any]) -> dict[str, Any]:
    rs = [r for r in slides if r["compression"] == comp]
    worst_count = max([abs(v) for r in rs for k in r if k.endswith("_count_rel_diff")
                       for v in r[k].values()] + [abs(v) for v in brca.get(comp, {}).get(
                           "count_rel_diff", {}).values()] or [0.0])
    v = {
        "bytes_ratio": max(r["bytes_ratio"] for r in rs),
        "psnr_db": min(r["psnr_db"] for r in rs),
        "probs_max_abs_diff": max(r[k] for r in rs for k in r if k.endswith("_probs_max_abs_diff")),
        "count_max_rel_diff": worst_count,
    }
    v["passes"] = bool(v["bytes_ratio"] <= 0.25 and v["psnr_db"] >= 40 and
                       v["probs_max_abs_diff"] <= 0.02 and v["count_max_rel_diff"] <= 0.01)
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-brca", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    models = {"detector": load_model(DEFAULT_MODEL), "classifier": load_model("phantom-demo")}
    with tempfile.TemporaryDirectory() as d:
        slides = slide_rows(a.codecs, Path(d), models)
        st = SlideStore(str(next(Path(d).glob(f"CMU-1-Small-Region-{LOSSLESS}/*.zarr"))))
        speed = speed_rows(a.codecs, st.images[: min(64, st.n_tiles)])
    if a.json:  # the slide part took long: keep it even if the BRCA part fails
        a.json.write_text(json.dumps({"slides": slides, "speed": speed}, indent=1, default=float))
    brca = {} if a.no_brca else brca_rows(a.codecs, models["detector"])
    verdicts = {c: verdict(c, slides, brca) for c in a.codecs}
    print("\n| codec | KB/tile (CMU, TCGA) | x lossless | bytes/mm^2 tissue (CMU) | PSNR dB (min tile) "
          "| probs max diff (det, cls) | counts max rel diff (slides, BRCA) | enc/dec ms | passes |")
    print("|---|---|---|---|---|---|---|---|---|")
    src_mm2 = next(r["source_bytes_per_mm2"] for r in slides if r["compression"] == LOSSLESS)
    for comp in [LOSSLESS, *a.codecs]:
        rs = [r for r in slides if r["compression"] == comp]
        kb = ", ".join(f"{r['bytes_per_tile'] / 1024:.1f}" for r in rs)
        cmu = rs[0]
        if comp == LOSSLESS:
            print(f"| {comp} (lossless) | {kb} | 1 | {cmu['bytes_per_mm2'] / 1e6:.2f} MB "
                  f"(source slide {src_mm2 / 1e6:.2f} MB) | inf | 0 | 0 | | reference |")
            continue
        v = verdicts[comp]
        pd_ = ", ".join(f"{max(r[f'{n}_probs_max_abs_diff'] for r in rs):.3f}" for n in models)
        sl = max([abs(x) for r in rs for x in r["detector_count_rel_diff"].values()] or [0.0])
        br = max([abs(x) for x in brca.get(comp, {}).get("count_rel_diff", {}).values()] or [0.0])
        sp = speed[comp]
        print(f"| {comp} | {kb} | {v['bytes_ratio']:.3f} | {cmu['bytes_per_mm2'] / 1e6:.2f} MB | "
              f"{min(r['psnr_db'] for r in rs):.1f} ({min(r['psnr_worst_tile_db'] for r in rs):.1f}) | "
              f"{pd_} | {sl:.3%}, {br:.3%} | {sp['encode_ms']:.2f} / {sp['decode_ms']:.2f} | "
              f"{'yes' if v['passes'] else 'no'} |")
    if a.json:
        a.json.write_text(json.dumps({"slides": slides, "speed": speed, "brca": brca,
                                      "verdicts": verdicts}, indent=1, default=float))


if __name__ == "__main__":
    main()
