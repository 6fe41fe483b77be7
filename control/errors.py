"""The one root of Drover's exceptions, with a machine-readable error code.

Every package but ``observability`` (a leaf) raises subclasses of :class:`DroverError`, so a caller can
catch Drover's failures apart from bugs, and every error carries a ``code`` (the wire's ``ErrorCode`` where
the error becomes a reply). This module imports nothing from the project: every layer may use it.
"""

from __future__ import annotations

from typing import ClassVar


class DroverError(Exception):
    """A failure Drover reports; ``code`` says which kind, ``message`` is for the user."""

    default_code: ClassVar[str] = "internal"

    def __init__(self, message: str = "", *, code: str | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code: str = code if code is not None else type(self).default_code
        self.request_id = request_id


class ConfigError(DroverError):
    """Settings or wiring that cannot work (a missing provisioner, a bad combination of options)."""

    default_code = "bad_config"
