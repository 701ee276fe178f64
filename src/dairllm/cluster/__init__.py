"""The cluster: a root and workers that each map the same `.m` file, run contiguous layer ranges
and pass only activations (protocol.py, assign.py, node.py, root.py)."""
from __future__ import annotations


def open_cluster(path, workers, **kwargs):
    """`Model.open(path, workers=[...])` lands here: a ClusterModel (same API as Model)."""
    from .root import ClusterModel

    return ClusterModel.open(path, workers=workers, **kwargs)


__all__ = ["open_cluster"]
