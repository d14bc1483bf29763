"""The store's schema, as an ordered list of migrations (sqlite-utils ``Migrations``).

Rule for changing the schema: never edit a migration that has shipped; append a new one.
``migrate`` applies the pending ones inside a single ``BEGIN IMMEDIATE`` transaction, so two
processes opening a fresh store at once cannot both apply the same migration.

CHECK constraints repeat the store's Python validation on purpose: ratings are the scarcest
data the app has, and the database itself should refuse a malformed row.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from feedback_store.errors import SchemaError

OUTCOMES: tuple[str, ...] = ("left", "right", "tie-both-good", "tie-both-bad", "skip")
ROUND_STATES: tuple[str, ...] = ("running", "finished", "failed")

MIGRATIONS = Migrations("feedback_store")


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


@MIGRATIONS(name="0001_initial")
def _initial(db: Database) -> None:
    db.executescript(f"""
    CREATE TABLE raters (
        id TEXT PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 200),
        kind TEXT NOT NULL DEFAULT 'person' CHECK (kind IN ('person', 'session', 'simulated')),
        name TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE prompts (
        id INTEGER PRIMARY KEY,
        text TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL
    );
    CREATE TABLE model_versions (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        parent_id INTEGER REFERENCES model_versions(id),
        weights_path TEXT,
        config TEXT NOT NULL DEFAULT '{{}}',
        metrics TEXT NOT NULL DEFAULT '{{}}',
        created_at TEXT NOT NULL
    );
    CREATE TABLE samples (
        id INTEGER PRIMARY KEY,
        uid TEXT NOT NULL UNIQUE,
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        model_version_id INTEGER REFERENCES model_versions(id),
        image_sha256 TEXT NOT NULL CHECK (length(image_sha256) = 64),
        image_path TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        seed INTEGER,
        sampler_settings TEXT NOT NULL DEFAULT '{{}}',
        stage_prompts TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE ratings (
        id INTEGER PRIMARY KEY,
        sample_id INTEGER NOT NULL REFERENCES samples(id),
        rater_id TEXT NOT NULL REFERENCES raters(id),
        stars INTEGER NOT NULL CHECK (stars BETWEEN 1 AND 5),
        submission_id TEXT UNIQUE,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        UNIQUE (rater_id, sample_id)
    );
    CREATE TABLE comparisons (
        id INTEGER PRIMARY KEY,
        left_id INTEGER NOT NULL REFERENCES samples(id),
        right_id INTEGER NOT NULL REFERENCES samples(id),
        outcome TEXT NOT NULL CHECK (outcome IN {_in(OUTCOMES)}),
        rater_id TEXT NOT NULL REFERENCES raters(id),
        response_time_s REAL CHECK (response_time_s IS NULL OR response_time_s >= 0),
        submission_id TEXT UNIQUE,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        CHECK (left_id != right_id)
    );
    -- One judgement per rater per unordered pair (whichever side each image was shown on).
    CREATE UNIQUE INDEX comparisons_rater_pair
        ON comparisons (rater_id, min(left_id, right_id), max(left_id, right_id));
    CREATE TABLE prompt_edits (
        id INTEGER PRIMARY KEY,
        original TEXT NOT NULL,
        edited TEXT NOT NULL,
        stage INTEGER,
        reason TEXT,
        rater_id TEXT REFERENCES raters(id),
        sample_id INTEGER REFERENCES samples(id),
        created_at TEXT NOT NULL
    );
    CREATE TABLE training_rounds (
        id INTEGER PRIMARY KEY,
        base_version_id INTEGER REFERENCES model_versions(id),
        output_version_id INTEGER REFERENCES model_versions(id),
        state TEXT NOT NULL CHECK (state IN {_in(ROUND_STATES)}),
        progress REAL NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
        config TEXT NOT NULL DEFAULT '{{}}',
        metrics TEXT NOT NULL DEFAULT '{{}}',
        error TEXT,
        started_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        finished_at TEXT
    );
    """)


@MIGRATIONS(name="0002_query_indexes")
def _query_indexes(db: Database) -> None:
    # The UI's hot queries: a rater's unrated samples, pairs per prompt, stats per version.
    db["samples"].create_index(["prompt_id"])
    db["samples"].create_index(["model_version_id"])
    db["samples"].create_index(["image_sha256"])
    db["ratings"].create_index(["sample_id"])
    db["comparisons"].create_index(["left_id"])
    db["comparisons"].create_index(["right_id"])
    db["training_rounds"].create_index(["state"])


def known_migrations() -> list[str]:
    return [m.name for m in MIGRATIONS._migrations]


SCHEMA_VERSION = len(known_migrations())


def schema_version(db: Database) -> int:
    return len(MIGRATIONS.applied(db))


def migrate(db: Database) -> list[str]:
    """Apply pending migrations; return their names. Raise ``SchemaError`` for a newer database."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        applied = [m.name for m in MIGRATIONS.applied(db)]
        unknown = [name for name in applied if name not in known_migrations()]
        if unknown:
            raise SchemaError(
                f"this database was written by a newer version of the app (unknown schema "
                f"migrations: {', '.join(unknown)}); upgrade the app to open it"
            )
        pending = [m.name for m in MIGRATIONS.pending(db)]
        MIGRATIONS.apply(db)
        db.conn.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise
    return pending
