"""Triton kernels and their launchers, one file per op family (shipped as posenc_fast.triton_kernels)."""
