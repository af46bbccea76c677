"""tmequant.phantom"""
