"""Who is rating: typed names locally; on a public app, ids nobody can claim for someone else.

- Local app: the rater id is the name typed at the top of the page (or passed to the API), as
  before; nothing is checked beyond its form.
- Public app (``--share`` or a Space): nobody types a name. A person signed in with Hugging
  Face (Spaces only) rates as their HF username. Anyone else is a guest: the browser keeps a
  random rater token (128 bits, in ``gr.BrowserState``) and rates as
  ``guest-<first 128 bits of SHA-256(token)>``. API clients get a token from the
  ``/rater_token`` endpoint and pass it where a rater id was asked for. The id is derived
  from the token on the server, so knowing someone's id is not enough to rate as them.
- Public statistics show keyed pseudonyms (``rater-<HMAC>``), never raw ids.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from app.errors import AppError

TOKEN_RE = re.compile(r"^rt-[0-9a-f]{32}$")
GUEST_PREFIX = "guest-"
SECRET_FILE = ".identity-secret"
TOKEN_HELP = ("this public app does not take rater names: pass a rater token from the /rater_token "
              "endpoint (see docs/security.md)")


def new_token() -> str:
    """A fresh rater token: 128 random bits."""
    return "rt-" + secrets.token_hex(16)


def guest_id(token: str) -> str:
    return GUEST_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:32]


def load_secret(data_dir: Path) -> bytes:
    """The app's own key (pseudonyms, the browser's stored token), kept in the data folder
    (never served) so that both survive a restart."""
    path = Path(data_dir) / SECRET_FILE
    try:
        secret = bytes.fromhex(path.read_text().strip())
        if len(secret) >= 32:
            return secret
    except (FileNotFoundError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


def sign_in_available() -> bool:
    """Whether "Sign in with Hugging Face" can work: a Space with ``hf_oauth: true`` gets an OAuth
    client id. Without one (e.g. a Space folder started locally with SPACE_ID set), Gradio's
    LoginButton would demand a local HF login instead, so raters stay guests."""
    import gradio.oauth

    return bool(gradio.oauth.OAUTH_CLIENT_ID)


class Identity:
    def __init__(self, public: bool, sign_in: bool, data_dir: Path):
        self.public = public
        self.sign_in = sign_in  # on a Space: "Sign in with Hugging Face"
        self.secret = load_secret(data_dir) if public else secrets.token_bytes(32)

    @property
    def browser_secret(self) -> str:
        """The key gr.BrowserState encrypts the stored rater token with."""
        return hmac.new(self.secret, b"browser-state", hashlib.sha256).hexdigest()

    def from_token(self, token: Any) -> str:
        if not isinstance(token, str) or not TOKEN_RE.match(token.strip()):
            raise AppError(TOKEN_HELP)
        return guest_id(token.strip())

    def api_rater(self, value: Any) -> Any:
        """The rater id for an API call: the value itself locally, the token's guest id when public."""
        return self.from_token(value) if self.public else value

    def browser_rater(self, token: Any, username: str | None) -> tuple[str, str]:
        """(rater id, token the browser keeps) for a page load on a public app."""
        if not (isinstance(token, str) and TOKEN_RE.match(token)):
            token = new_token()
        if username:
            return username, token
        return guest_id(token), token

    def pseudonym(self, rater_id: str) -> str:
        return "rater-" + hmac.new(self.secret, rater_id.encode(), hashlib.sha256).hexdigest()[:10]

    def public_rows(self, rows: Iterable[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
        """Statistics rows with raw rater ids replaced by pseudonyms (public apps only)."""
        rows = list(rows)
        if not self.public:
            return rows
        return [{k: (self.pseudonym(v) if k in keys and isinstance(v, str) else v) for k, v in r.items()}
                for r in rows]
