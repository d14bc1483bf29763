"""One place that turns the errors a person can fix into messages in the browser (gr.Error).

Services raise ``AppError`` (or the store's, the prompt checker's and DCoT's own errors);
``user_errors`` wraps every UI handler and API endpoint, so each shows a clear message and a
bug still shows up as a bug (with a traceback in the server log).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import gradio as gr

from app.worker import WorkerBusy
from feedback_store import StoreError
from rlr_core.backends.base import PromptError
from rlr_core.dcot import StageError

F = TypeVar("F", bound=Callable)


class AppError(ValueError):
    """Bad input or an action that does not fit the app's state; the message is for the user."""


class NotAllowed(AppError):
    """An admin-only action without the admin password."""


USER_ERRORS: tuple[type[BaseException], ...] = (AppError, StoreError, PromptError, StageError, WorkerBusy)


def user_errors(fn: F) -> F:
    """Re-raise the errors a user can act on as ``gr.Error`` with their message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapper  # type: ignore[return-value]
