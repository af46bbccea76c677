"""Tile grid at a target MPP and the per-slide zarr store."""

from tmequant.tiling.grid import TilePlan, plan_grid
from tmequant.tiling.source import SlideTiles, open_tiles
from tmequant.tiling.store import SlideStore, mark_complete, store_is_complete, store_path
from tmequant.tiling.tile import COMPRESSIONS, NO_PIXELS, TileResult, TilingParams, tile_slide

__all__ = [
    "COMPRESSIONS", "NO_PIXELS", "SlideStore", "SlideTiles", "TilePlan", "TileResult", "TilingParams",
    "mark_complete", "open_tiles", "plan_grid", "store_is_complete", "store_path", "tile_slide",
]
