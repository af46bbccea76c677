"""`tmequant tile` (placeholder until the tiling module lands)."""
