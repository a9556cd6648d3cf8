"""Model optimization: calibration, quantized/compiled variants per accelerator, evaluation and report."""
