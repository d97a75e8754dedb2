"""Typed errors of diffkv.

Two kinds (SPEC section 4):

* :class:`UnsupportedConfigError` -- a well-formed configuration that a
  backend does not implement. It is a ``NotImplementedError`` (what vLLM's
  backends raise) and carries every reason at once in ``.reasons``.
* :class:`InvalidInputError` -- malformed input (a ``ValueError``): wrong
  rank/shape/dtype/device, inconsistent metadata. Subclasses say which part
  of the input is wrong, so callers may catch narrowly or broadly.

Every message names the argument, the value or shape received and what was
expected.
"""

from __future__ import annotations

from collections.abc import Iterable


class UnsupportedConfigError(NotImplementedError):
    """A well-formed configuration this backend does not support.

    Attributes:
        reasons: every reason at once, each a full sentence.
        backend: name of the backend that refused, if known.
    """

    def __init__(self, reasons: Iterable[str] | str, backend: str | None = None):
        if isinstance(reasons, str):
            reasons = [reasons]
        self.reasons: list[str] = list(reasons)
        self.backend = backend
        who = f"{backend} does not support this configuration" if backend else "unsupported configuration"
        lines = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(f"{who}:\n{lines}")


class InvalidInputError(ValueError):
    """Malformed input: the message names the argument, what was received
    and what was expected."""


class ShapeError(InvalidInputError):
    """A tensor has the wrong rank or shape, or shapes disagree."""


class DTypeError(InvalidInputError):
    """A tensor has the wrong dtype (or dtypes disagree)."""


class DeviceError(InvalidInputError):
    """Tensors live on different devices."""


class MetadataError(InvalidInputError):
    """Metadata values are inconsistent (seq_lens, query_start_loc,
    block_table, slot_mapping)."""


def raise_if_unsupported(reasons: list[str], backend: str | None = None) -> None:
    """Raise :class:`UnsupportedConfigError` carrying ``reasons`` if any."""
    if reasons:
        raise UnsupportedConfigError(reasons, backend=backend)
