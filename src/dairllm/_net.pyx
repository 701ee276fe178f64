# cython: language_level=3
"""Binary wire framing."""

include "_net_dllama.pxi"
include "_net_frames.pxi"
