"""Dynamo's and AOT autograd's control-flow exceptions: signals the backend must let through.

A backend runs inside Dynamo's compile of a frame. Some exceptions raised under it are
not failures but instructions to Dynamo, which catches them itself:

- ``RestartAnalysis`` and its kinds, e.g. ``TensorifyScalarRestartAnalysis``: AOT
  autograd found a Python float it cannot keep symbolic and asks Dynamo to trace the
  frame again with that float specialized;
- ``SkipFrame``: run this frame without compiling it;
- ``ShortenTraceback`` (``BackendCompilerFailed`` among them): an error Dynamo reports
  to the user itself, with a shorter traceback;
- ``ResetRequired``: Dynamo's state must be reset first.

Where the backend catches errors to fall back to the unmodified graph, it re-raises
these (:func:`is_dynamo_signal`), as Dynamo's own ``aot_autograd`` backend does.
"""

from __future__ import annotations

__all__ = ["is_dynamo_signal"]

_NAMES = ("RestartAnalysis", "SkipFrame", "ShortenTraceback", "ResetRequired")
_signals: tuple | None = None


def is_dynamo_signal(e: BaseException) -> bool:
    """True when ``e`` is a Dynamo / AOT autograd control-flow exception that must propagate.

    Args:
        e: an exception caught around a compile step.

    Returns:
        True for the exception kinds listed in this module (those this torch has).
    """
    global _signals
    if _signals is None:
        from torch._dynamo import exc

        _signals = tuple(getattr(exc, n) for n in _NAMES if isinstance(getattr(exc, n, None), type))
    return isinstance(e, _signals)
