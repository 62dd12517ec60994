"""Errors lmc raises.

``LmcError`` is a *user* error: bad path, corrupt file, unsupported op, a dynamic dim left unbound, an
impossible budget. The CLI prints its message on one line and exits with ``ExitCode.USER_ERROR``. Anything
else that escapes is an internal bug (``ExitCode.INTERNAL_ERROR``).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL_ERROR = 1
    USER_ERROR = 2
    VERIFY_FAILED = 3


class LmcError(Exception):
    """A mistake in what the user gave lmc; the message says what and where."""


class ModelLoadError(LmcError):
    """The model file is missing, unreadable, corrupt or unsafe."""


class ShapeError(LmcError):
    """A shape could not be bound or stayed dynamic where a static one is needed."""


class TargetError(LmcError):
    """The target name is unknown or its description is invalid."""


class PositionBiasFound(LmcError):
    """An attention mask adds a bias to the scores it keeps (ALiBi, a relative position bias): not a plain
    mask. A generation build answers it by splitting the bias off and compiling again."""


class AttentionSinksFound(LmcError):
    """An attention concatenates learned sink logits before its softmax. A generation build answers it by
    splitting the sinks off and compiling again."""


class VerificationFailed(LmcError):
    """The bundle's outputs differ from the original's by more than the accepted error (exit code 3);
    ``report``: the ``lmc.compiler.verify.VerifyReport`` that says by how much (None when there is none)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
