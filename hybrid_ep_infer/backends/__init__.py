"""The backends behind ``EPBuffer``: one interface (``base.Backend``), two implementations.

``reference`` is docs/SPEC.md in plain torch (eager, any device: the oracle); ``cuda`` runs
the compiled library's kernels over NVLink peer memory; ``multinode`` runs them across
nodes, reaching other nodes through NVSHMEM (a ``cuda`` backend to the caller).
"""

from .base import Backend
from .cuda import CudaBackend
from .multinode import MultinodeBackend
from .reference import ReferenceBackend

__all__ = ["Backend", "CudaBackend", "MultinodeBackend", "ReferenceBackend"]
