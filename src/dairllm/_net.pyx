# cython: language_level=3
"""Binary wire framing: distributed-llama's protocol (_net_dllama.pxi) and dairllm's own frames
(_net_frames.pxi)."""

from .formats.quant import FloatType

include "_net_dllama.pxi"
include "_net_frames.pxi"
