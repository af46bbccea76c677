"""tmequant.biomarkers"""
