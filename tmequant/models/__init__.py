"""tmequant.models"""
