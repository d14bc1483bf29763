"""The feedback store: human ratings, comparisons, prompts, samples and model versions.

    from feedback_store import FeedbackStore
    store = FeedbackStore("data")            # data/feedback.db + data/images/
"""

from feedback_store.errors import (
    DuplicateError,
    ImportFormatError,
    NotFoundError,
    SchemaError,
    StateError,
    StoreBusyError,
    StoreError,
    StoreFullError,
    ValidationError,
)
from feedback_store.queries import OUTCOME_LABEL, PairCandidate, PreferenceRecords
from feedback_store.schema import OUTCOMES, SCHEMA_VERSION
from feedback_store.store import FeedbackStore

__all__ = [
    "OUTCOMES", "OUTCOME_LABEL", "SCHEMA_VERSION", "DuplicateError", "FeedbackStore", "ImportFormatError",
    "NotFoundError", "PairCandidate", "PreferenceRecords", "SchemaError", "StateError", "StoreBusyError",
    "StoreError", "StoreFullError", "ValidationError",
]
