"""Training rounds in the store: started, updated while running, then finished or failed."""

from __future__ import annotations

import json
from typing import Any

from sqlite_utils import Database

from feedback_store import validation as v
from feedback_store.base import StoreBase, decode_row
from feedback_store.errors import StateError


class TrainingRoundsMixin(StoreBase):
    def get_training_round(self, round_id: int) -> dict[str, Any]:
        return decode_row(self._require(self.db, "training_rounds", v.identifier(round_id, "round id"),
                                        "training round"))

    def training_rounds(self, state: str | None = None) -> list[dict[str, Any]]:
        where, args = ("state = ?", [state]) if state else (None, None)
        return [decode_row(r) for r in self.db["training_rounds"].rows_where(where, args, order_by="id")]

    def start_training_round(self, base_version_id: int | None = None, config: dict | None = None) -> int:
        now = v.now()
        row = {"base_version_id": base_version_id, "state": "running", "progress": 0.0,
               "config": v.json_object(config, "training config"), "metrics": "{}",
               "started_at": now, "updated_at": now}

        def tx(db: Database) -> int:
            if base_version_id is not None:
                self._require(db, "model_versions", v.identifier(base_version_id, "version id"),
                              "model version")
            return db["training_rounds"].insert(row).last_pk

        return self._write(tx)

    def _update_running(self, round_id: int, updates: dict[str, Any], merge_metrics: dict | None) -> None:
        v.identifier(round_id, "round id")
        v.json_object(merge_metrics, "training metrics")

        def tx(db: Database) -> None:
            row = self._require(db, "training_rounds", round_id, "training round")
            if row["state"] != "running":
                raise StateError(f"training round {round_id} is {row['state']}, not running")
            if updates.get("output_version_id") is not None:
                self._require(db, "model_versions", updates["output_version_id"], "model version")
            metrics = {**json.loads(row["metrics"]), **(merge_metrics or {})}
            db["training_rounds"].update(round_id, {**updates, "metrics": json.dumps(metrics, sort_keys=True),
                                                    "updated_at": v.now()})

        self._write(tx)

    def update_training_round(self, round_id: int, progress: float, metrics: dict | None = None) -> None:
        self._update_running(round_id, {"progress": v.progress(progress)}, metrics)

    def finish_training_round(self, round_id: int, output_version_id: int | None = None,
                              metrics: dict | None = None) -> None:
        self._update_running(round_id, {"state": "finished", "progress": 1.0,
                                        "output_version_id": output_version_id,
                                        "finished_at": v.now()}, metrics)

    def fail_training_round(self, round_id: int, error: str) -> None:
        self._update_running(round_id, {"state": "failed", "error": v.text(error, "error message"),
                                        "finished_at": v.now()}, None)

    def mark_interrupted_rounds_failed(self, error: str = "interrupted: the app stopped while this "
                                       "round was running") -> int:
        """On app start: no round can still be running, so mark any 'running' one failed."""
        def tx(db: Database) -> int:
            now = v.now()
            cur = db.execute("UPDATE training_rounds SET state = 'failed', error = ?, updated_at = ?, "
                             "finished_at = ? WHERE state = 'running'", [error, now, now])
            return cur.rowcount

        return self._write(tx)
