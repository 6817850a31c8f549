"""Triton kernels for the hybrid sliding-window + linear attention."""
