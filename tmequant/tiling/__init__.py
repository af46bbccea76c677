"""Tile grid at a target MPP and the per-slide zarr store."""

from tmequant.tiling.store import SlideStore, mark_complete, store_is_complete, store_path

__all__ = ["SlideStore", "mark_complete", "store_is_complete", "store_path"]
