"""tmequant.wsi"""
