"""Gradio's per-call session state, made lazy: an API call no longer pays for the whole page's config.

Why: every call through Gradio's HTTP call API (``POST /gradio_api/call/<name>``, what a Space's
visitors' scripts and ``curl`` use) that brings no session of its own gets a new
``gradio.state_holder.SessionState``, and its ``__init__`` builds the config of every block of
the page (about 250 here, ``Component.get_config`` each): 8-15 ms of GIL-holding work per call,
three quarters of the server's GIL time under 50 raters (bench/load.py's profile,
docs/benchmarks.md "Load"). A rating endpoint reads none of it.

What changes: the per-block configs are built when first asked for. Gradio already computes a
missing one itself where it updates a value (``_update_value_in_config``); the one place that
reads them all, the ``components`` property (deep links), fills in the missing ones first, so
what it yields is the same as before. The replacement is installed only over the exact Gradio
code it was written against (a fingerprint of both functions' source); any other Gradio keeps its
own, with a warning, and tests/test_gradio_sessions.py fails so the next upgrade looks again.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from collections.abc import Iterator
from copy import copy
from typing import Any

from gradio.state_holder import SessionState

# sha256 of the source of SessionState.__init__ and SessionState.components in gradio 6.31.0
EXPECTED = {"__init__": "1b2ea21dc42c45dafb54280eccd932efe6851230b7f896ddbfd4cf593bc0d06b",
            "components": "010247a9cb27797d12352d10fcfa9b47ef6c272cec00db9ac91538b201ea17b8"}
_ORIGINAL: dict[str, Any] = {"__init__": SessionState.__init__, "components": SessionState.components}


def fingerprints() -> dict[str, str]:
    return {name: hashlib.sha256(inspect.getsource(getattr(fn, "fget", fn)).encode()).hexdigest()
            for name, fn in _ORIGINAL.items()}


def _lazy_init(self: SessionState, blocks: Any) -> None:
    self.blocks_config = copy(blocks.default_config)
    self._page_block_ids = frozenset(blocks.blocks)  # the keys the eager version built configs for
    self.config_values = {}
    self.state_data = {}
    self._state_ttl = {}
    self.is_closed = False
    self.STATE_TTL_WHEN_CLOSED = 1 if os.getenv("GRADIO_IS_E2E_TEST", None) else 3600


def _all_components(self: SessionState) -> Iterator[dict]:
    for key, block in self.blocks_config.blocks.items():
        if key not in self.config_values and key in self._page_block_ids:
            self.config_values[key] = self.blocks_config.config_for_block(key, [], block)
    for config in self.config_values.values():
        if config:
            yield config


def install() -> bool:
    """Make new sessions lazy; False (and a warning) when this Gradio's code is not the known one."""
    if SessionState.__init__ is _lazy_init:
        return True
    if fingerprints() != EXPECTED:
        warnings.warn("gradio's SessionState is not the version app/gradio_sessions.py knows: each API call "
                      "keeps building the whole page's config", stacklevel=2)
        return False
    SessionState.__init__ = _lazy_init
    SessionState.components = property(_all_components)
    return True
