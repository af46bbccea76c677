"""tmequant.report"""
