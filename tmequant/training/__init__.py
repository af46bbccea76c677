"""tmequant.training"""
