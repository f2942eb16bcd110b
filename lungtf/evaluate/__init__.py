"""Evaluation: metrics, calibration, Grad-CAM, top losses and model comparison on a split.

Submodules:
    metrics: scikit-learn metrics, the cancer-versus-benign view, group bootstrap, McNemar.
    calibration: expected calibration error, reliability bins, temperature scaling.
"""
