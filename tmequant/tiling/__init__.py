"""Tile grid at a target MPP and the per-slide zarr store."""

from tmequant.tiling.grid import TilePlan, plan_grid
from tmequant.tiling.store import SlideStore, mark_complete, store_is_complete, store_path
from tmequant.tiling.tile import COMPRESSIONS, TileResult, TilingParams, tile_slide

__all__ = [
    "COMPRESSIONS", "SlideStore", "TilePlan", "TileResult", "TilingParams", "mark_complete",
    "plan_grid", "store_is_complete", "store_path", "tile_slide",
]
