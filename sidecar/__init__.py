"""The sidecar: runs beside Triton on a device and swaps model versions safely."""
