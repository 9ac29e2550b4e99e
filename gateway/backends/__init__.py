"""Desktop backends behind one small interface (see :mod:`gateway.backends.base`)."""

from .base import Backend, BackendError, Endpoint, PollResult, Status

__all__ = ["Backend", "BackendError", "Endpoint", "PollResult", "Status"]
