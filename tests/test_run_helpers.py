"""Synthetic inputs for the `tmequant run` tests: tiny slides with tissue in known places and a
tiny random model whose card matches them (64 px tiles at 1 um/px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TILE_PX = 64
MPP_UM = 1.0
BG = (240, 238, 242)
# Per slide: tissue rectangles in grid cells ((r0, r1), (c0, c1)) and their colour.
SLIDES = {
    "S1": [((1, 6), (1, 7), (200, 90, 160)), ((6, 9), (3, 10), (120, 60, 170))],
    "S2": [((2, 10), (2, 5), (200, 90, 160)), ((4, 8), (6, 11), (150, 70, 170))],
}


def tissue_cells(slide_id: str) -> set[tuple[int, int]]:
    """Grid cells (row, col) covered by tissue: exactly the tiles tiling must keep."""
    return {(r, c) for (r0, r1), (c0, c1), _ in SLIDES[slide_id]
            for r in range(r0, r1) for c in range(c0, c1)}


def write_slides(folder: Path) -> dict[str, Path]:
    """S1.tif, S2.tif (pyramidal TIFF, 1 um/px, dark 'nuclei' dots in the tissue) and BAD.tif."""
    from tmequant.wsi import write_pyramid_tiff

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = TILE_PX
    out = {}
    for sid, rects in SLIDES.items():
        img = np.empty((12 * t + 40, 12 * t + 40, 3), np.uint8)
        img[:] = BG
        for (r0, r1), (c0, c1), col in rects:
            img[r0 * t:r1 * t, c0 * t:c1 * t] = col
            n = (r1 - r0) * (c1 - c0) * 6
            for y, x in zip(rng.integers(r0 * t + 4, r1 * t - 4, n), rng.integers(c0 * t + 4, c1 * t - 4, n)):
                img[y - 3:y + 4, x - 3:x + 4] = (60, 30, 110)
        out[sid] = write_pyramid_tiff(folder / f"{sid}.tif", img, MPP_UM, flavor="tiff", compression="zlib")
    bad = folder / "BAD.tif"
    bad.write_bytes(b"this is not a TIFF file")
    out["BAD"] = bad
    return out


def write_model(folder: Path, count_head: bool = False) -> Path:
    """A seeded random `test_efficientnet` for 64 px tiles at 1 um/px (no count head by default)."""
    import torch

    from tmequant.models import ModelCard, create_model, save_model
    from tmequant.roles import CELL_ROLES, TISSUE_ROLES

    extra = {"cell_classes": list(CELL_ROLES), "cell_roles": {r: r for r in CELL_ROLES}} if count_head else {}
    card = ModelCard(name="tiny-run", arch="test_efficientnet", tile_px=TILE_PX, mpp_um=MPP_UM,
                     tissue_classes=list(TISSUE_ROLES), tissue_roles={r: r for r in TISSUE_ROLES},
                     **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = create_model(card, pretrained=False)
    return save_model(folder, net, card)


async def declare_gpu(dask_worker) -> None:
    """Run on one Dask worker (``client.run``): it now offers the resource ``GPU=1``."""
    await dask_worker.set_resources(GPU=1)
