# cython: language_level=3
"""Binary wire framing."""
