"""Where the server's time goes: py-spy's raw samples (``--threads``, one stack per line) split by kind.

    py-spy record --pid PID --format raw --threads --gil --output profile.txt
    python -m bench.profile_split profile.txt

With ``--gil`` py-spy samples only the thread holding the GIL, so the shares say who the raters'
requests wait behind. Each stack goes to the first matching kind, checked from the innermost
frame outwards within the app's own code, else by the libraries on it.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

# (kind, frame pattern); innermost match wins among the app's own work.
APP_WORK = [
    ("app: SQLite (sqlite-utils, queries)", re.compile(r"sqlite_utils/|sqlite3/|feedback_store/")),
    ("app: images (read, PNG, base64, copies)", re.compile(r"PIL/|base64|app/files\.py|app/video\.py|png_bytes")),
    ("app: model (generation, judges)", re.compile(r"torch/|rlr_core/|diffusers/")),
]
APP_CODE = re.compile(r"\((?:[^ ]*/)?(?:app|feedback_store)/[a-z_/]+\.py:")
GRADIO_SESSION = re.compile(r"gradio/state_holder\.py|restore_session_state")
GRADIO = re.compile(r"gradio/|gradio_client/|starlette/|fastapi/|uvicorn/|anyio/|pydantic|orjson|h11/|httptools|"
                    r"asyncio/|sse_starlette|safehttpx|httpx/|httpcore/|multipart/")


def kind(thread: str, frames: list[str]) -> str:
    if "rlr-worker" in thread or "round" in thread:
        return "training round (worker thread)"
    if any(APP_CODE.search(f) for f in frames):
        start = max(i for i, f in enumerate(frames) if APP_CODE.search(f))
        for frame in reversed(frames[start:]):  # innermost first
            for name, pattern in APP_WORK:
                if pattern.search(frame):
                    return name
        return "app: other (validation, dicts, scrubbing)"
    if any(GRADIO_SESSION.search(f) for f in frames):
        return "gradio: per-call session state"
    if any(GRADIO.search(f) for f in frames):
        return "gradio: queue, routes, event stream"
    return "other"


def split(path: Path) -> dict:
    counts: Counter[str] = Counter()
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        thread, *frames = stack.split(";")
        counts[kind(thread, frames)] += int(n)
    total = sum(counts.values())
    rows = [{"where": k, "samples": v, "share": round(v / total, 3)} for k, v in counts.most_common()]
    return {"samples": total, "rows": rows}


if __name__ == "__main__":
    from bench.common import print_table

    out = split(Path(sys.argv[1]))
    print_table(out["rows"], ["where", "samples", "share"], title=f"{out['samples']} samples")
