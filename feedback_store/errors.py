"""Errors the store raises. Every message is written for the person using the app.

All derive from :class:`StoreError`, so a UI can catch one class and show ``str(err)``.
Each is raised before anything is written: an error means the store did not change.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the feedback store raises on purpose."""


class NotFoundError(StoreError, LookupError):
    """An id (sample, model version, training round, ...) that is not in the store."""


class ValidationError(StoreError, ValueError):
    """A value outside what the store accepts (stars out of range, unknown outcome, ...)."""


class DuplicateError(StoreError):
    """A second answer where one is allowed: the same rater rating the same sample twice,
    or a submission id reused for a different answer. ``existing_id`` is the row kept."""

    def __init__(self, message: str, existing_id: int | None = None):
        super().__init__(message)
        self.existing_id = existing_id


class StateError(StoreError):
    """An operation that does not fit an object's state (finishing a failed training round)."""


class ImportFormatError(StoreError):
    """A folder given to ``import_folder`` that is not a valid export; nothing was imported."""


class SchemaError(StoreError):
    """A database written by a newer version of this code (unknown migrations)."""


class StoreBusyError(StoreError):
    """The database stayed locked by other writers for longer than the retry budget."""


class StoreFullError(StoreError):
    """The disk (or the file-size limit) is full: the change was not saved, nothing half-written."""


FULL_MESSAGE = ("the disk holding the feedback store is full: this was not saved (nothing was half-written); "
                "free some space and try again")
