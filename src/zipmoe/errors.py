"""One small error hierarchy. Messages say what was wrong and what to do; the CLI prints them
without a traceback and exits with status 2."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zipmoe.types import ExpertKey


class ZipMoEError(Exception):
    """Base of every error zipmoe raises on purpose."""


class StoreFormatError(ZipMoEError):
    """A store's header or index breaks an invariant of store/FORMAT.md."""


class StoreVersionError(StoreFormatError):
    """The store was written by a newer, incompatible format version."""


class StoreIncompleteError(StoreFormatError):
    """The directory is not a complete store (e.g. an interrupted conversion)."""


class ChecksumError(ZipMoEError):
    """Bytes read from the store do not match their recorded checksum: corruption, never computed with."""


class ConversionError(ZipMoEError):
    """A checkpoint cannot be converted as asked (bad path, not MoE, wrong dtype, destination problem)."""


class UnsupportedModelError(ZipMoEError):
    """The model_type has no adapter and the generic rule does not apply."""


class BudgetTooSmallError(ZipMoEError):
    """The memory budget cannot hold the minimum the engine needs; the message states that minimum."""

    def __init__(self, message: str, minimum_bytes: int):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class CodecError(ZipMoEError):
    """An exponent coder got a payload it cannot decode, or an unknown codec id."""


class VerificationError(ZipMoEError):
    """A store's content differs from what it should hold (its own tensor checksums or the checkpoint)."""


class ExpertTaskError(ZipMoEError):
    """An engine op (read, decode, merge) failed for one expert; the original exception is the __cause__."""

    def __init__(self, message: str, key: ExpertKey, stage: str):
        super().__init__(message)
        self.key, self.stage = key, stage
