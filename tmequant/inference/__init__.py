"""tmequant.inference"""
