"""The native cluster: a root and workers that each map the same `.m` file, run contiguous layer
ranges and pass only activations (protocol.py, assign.py, node.py, root.py)."""
