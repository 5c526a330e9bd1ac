"""The error a user can cause and fix: the CLI prints its message on one line and exits with 2.

Every module raises a subclass (ConfigError, ShardError, LayoutError, CheckpointError, ...) whose
message names the file or key at fault and what to do; anything else is a bug and keeps its
traceback. ``zsadx --debug`` (or ``ZSADX_DEBUG=1``) shows the traceback of user errors too.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input a user can fix: a file, a key, a value, a folder, a lock held by someone else."""


class DiskFullError(UserError, OSError):
    """No space left (or quota exceeded) while writing; the message names the path."""

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] ..."
        return str(self.strerror if self.strerror is not None else super().__str__())


class LockedError(UserError):
    """Another zsadx process holds the lock of a folder; the message names the holder."""


class UnsafePathError(UserError, ValueError):
    """A name or index entry that would lead outside the folder it belongs to."""
