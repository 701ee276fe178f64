# cython: language_level=3
"""Compute kernels shared by every execution mode (single node, streaming, cluster, dllama worker)."""

def build_info():
    """What this build of the kernels was compiled with and selects at run time."""
    return {}
