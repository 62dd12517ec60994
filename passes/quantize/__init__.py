"""Quantization: scale choice (``scales``), calibration statistics (``calibration``) and the passes."""
