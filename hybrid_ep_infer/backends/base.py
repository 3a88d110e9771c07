"""The interface every backend implements: what ``EPBuffer`` runs a call on.

The buffer (``buffer.py``) owns everything about a call that is the same on every
backend: the argument checks (``validation.py``), which dispatch is the latest, the
handles, and whether the buffer is closed or broken. A backend owns the execution and
the tensors it writes: the dispatch outputs and the default combine output, allocated
once at construction and reused by every call (docs/SPEC.md section 5).

Each call gets one checked argument object (``calls.py``). Under torch.compile the custom
ops are given *functional copies* of the backend's output tensors, so where the op hands
over tensors, the interface names them: ``dispatch(args, into=...)`` must leave its results
in ``into``, and ``CombineArgs.dispatched`` carries the dispatch outputs combine must read.

The split halves (``dispatch_send``/``dispatch_recv``, ``combine_send``/``combine_recv``)
take the same argument objects; the one-call ops equal send + receive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..calls import CombineArgs, DispatchArgs, DispatchOutputs
from ..errors import ErrorSnapshot


class Backend(ABC):
    """Executes dispatch and combine for one buffer. Arguments arrive checked.

    The constructor allocates :attr:`outputs` and :attr:`combine_out`; :meth:`close`
    sets both to None.
    """

    name: ClassVar[str]  # "cuda" or "reference", as EPBuffer.backend reports it
    outputs: DispatchOutputs  # the tensors every dispatch writes, held for the buffer's lifetime
    combine_out: torch.Tensor  # [T, H] bf16: combine's output when the caller gives none

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Device bytes this backend holds (the formula: ``memory.py``)."""

    def combine_output(self, num_rows: int) -> torch.Tensor:
        """``[num_rows, H]`` bf16 view of :attr:`combine_out`."""
        return self.combine_out[:num_rows]

    @abstractmethod
    def dispatch(self, args: DispatchArgs, *, into: DispatchOutputs | None = None) -> object:
        """Run one dispatch (docs/SPEC.md section 3) on the current stream.

        Results go to ``into`` when given (the custom op's tensors, which may be functional
        copies of :attr:`outputs`), else to :attr:`outputs`. Returns this backend's state of
        the dispatch, which the buffer keeps and passes to :meth:`combine`.
        """

    @abstractmethod
    def combine(self, args: CombineArgs, state: object) -> torch.Tensor:
        """Run one combine (docs/SPEC.md section 4) for the dispatch that returned ``state``,
        writing ``args.out``, which it returns. Dispatch results (such as the weights) are
        read from ``args.dispatched`` when given, else from :attr:`outputs`."""

    @property
    @abstractmethod
    def supports_split(self) -> bool:
        """Whether the split halves below work on this backend instance."""

    @abstractmethod
    def dispatch_send(self, args: DispatchArgs) -> object:
        """The send half of :meth:`dispatch`: this rank's routing and rows leave; waits for
        no peer. The inputs may be overwritten afterwards. Returns what
        :meth:`dispatch_recv` needs."""

    @abstractmethod
    def dispatch_recv(self, sent: object, *, into: DispatchOutputs | None = None) -> object:
        """The receive half: completes the dispatch ``sent`` started, into ``into`` when given
        (as :meth:`dispatch`), else :attr:`outputs`. Returns the dispatch's state, as
        :meth:`dispatch` does."""

    @abstractmethod
    def combine_send(self, args: CombineArgs, state: object) -> object:
        """The send half of :meth:`combine`: this rank's partial sums leave; ``args.y``,
        ``args.topk_idx`` and ``args.dispatched`` may be overwritten afterwards. Returns what
        :meth:`combine_recv` needs."""

    @abstractmethod
    def combine_recv(self, sent: object) -> torch.Tensor:
        """The receive half: sums the partials into ``args.out`` of the send, and returns it."""

    @abstractmethod
    def take_errors(self) -> ErrorSnapshot:
        """The error counts since the last take (docs/SPEC.md section 6), then cleared."""

    @abstractmethod
    def timed_out(self) -> ErrorSnapshot | None:
        """The error block if a wait for a peer has timed out (read without a sync and
        without clearing), else None."""

    @abstractmethod
    def close(self) -> None:
        """Release everything the backend holds. Called once, by ``EPBuffer.close``."""
