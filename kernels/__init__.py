"""Kernels: each compute-heavy function as a plain-torch reference (and, beside it, a Triton kernel).

This package imports nothing from the engine: it is torch (and triton) only.
"""
