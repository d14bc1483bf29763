"""The app's own small settings that must survive a restart (``data_dir/app_state.json``).

Everything about people's judgements lives in the feedback store; this file only holds which
model version is active and the Train/Prompt-lab settings. It is replaced atomically (write,
fsync, rename), so a crash leaves the old or the new file, never half of one: killing the app
mid-round keeps the last good version active.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlr_core import dcot

STATE_FILE = "app_state.json"


@dataclass
class AppState:
    active_version_id: int | None = None
    boundaries: tuple[float, float] = dcot.DEFAULT_BOUNDARIES
    focus_stage: str = "all"  # "all" or a DCoT stage the next round's HO block is restricted to
    auto_train_every: int = 0  # 0 = off
    ratings_at_last_round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class StateFile:
    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / STATE_FILE
        self._lock = threading.Lock()
        self._state = self._read()

    def _read(self) -> AppState:
        if not self.path.exists():
            return AppState()
        try:
            raw = json.loads(self.path.read_text())
            raw["boundaries"] = tuple(raw.get("boundaries", dcot.DEFAULT_BOUNDARIES))
            known = set(AppState.__dataclass_fields__)
            return AppState(**{k: v for k, v in raw.items() if k in known})
        except (ValueError, TypeError) as err:
            # A damaged settings file must not stop the app; ratings are elsewhere.
            print(f"warning: ignoring unreadable {self.path}: {err}")
            return AppState()

    def get(self) -> AppState:
        with self._lock:
            return AppState(**asdict(self._state))

    def update(self, **changes: Any) -> AppState:
        with self._lock:
            for key, value in changes.items():
                if key not in AppState.__dataclass_fields__:
                    raise KeyError(key)
                setattr(self._state, key, value)
            self._write(self._state)
            return AppState(**asdict(self._state))

    def _write(self, state: AppState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(state), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
