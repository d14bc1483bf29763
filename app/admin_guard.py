"""Who may change the model or the data on a public app, and a brake on password guessing.

A local app is open. A public one (``--share`` or a Space) lets in:
- the admin password (``RLR_ADMIN_PASSWORD``), compared in constant time; after
  ``FREE_TRIES`` wrong passwords in a row every password is refused for a lockout that
  doubles with each further wrong one (up to ``MAX_LOCK_S``); a right one resets the count;
- Hugging Face users named in ``RLR_ADMINS``, once signed in: the page then holds an admin
  key issued to that browser session (random, kept in memory, gone at restart), which the
  admin actions present in place of the password.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable, Iterable

from app.errors import NotAllowed

FREE_TRIES = 5
FIRST_LOCK_S = 2.0
MAX_LOCK_S = 300.0
KEY_PREFIX = "admin-key-"


class AdminGuard:
    def __init__(self, public: bool, password: str | None, admins: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic):
        self.public = public
        self.password = password or None
        self.admins = frozenset(a.strip() for a in admins if a and a.strip())
        self.clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._locked_until = 0.0
        self._keys: dict[str, str] = {}  # admin key -> HF username

    @property
    def enabled(self) -> bool:
        """Whether anyone can do admin actions on this public app."""
        return bool(self.password or self.admins)

    def is_admin_user(self, username: str | None) -> bool:
        return bool(username) and username in self.admins

    def issue_key(self, username: str) -> str:
        """An admin key for a signed-in user named in RLR_ADMINS (NotAllowed for anyone else)."""
        if not self.is_admin_user(username):
            raise NotAllowed(f"{username!r} is not an admin of this app")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._keys[key] = username
        return key

    def check(self, password: object) -> None:
        """Return if ``password`` (or an admin key) lets its holder in; raise NotAllowed if not."""
        if not self.public:
            return
        if not self.enabled:
            raise NotAllowed("this public app has no admin password set (RLR_ADMIN_PASSWORD), "
                             "so training, switching versions and importing data are switched off")
        given = password if isinstance(password, str) else ""
        with self._lock:
            if given.startswith(KEY_PREFIX) and any(hmac.compare_digest(given, k) for k in self._keys):
                return
            now = self.clock()
            if now < self._locked_until:
                raise NotAllowed(f"too many wrong admin passwords: try again in "
                                 f"{max(1, round(self._locked_until - now))} s")
            if self.password and hmac.compare_digest(given.encode(), self.password.encode()):
                self._failures = 0
                return
            if given:  # an empty password guesses nothing: it must not lock the admins out
                self._failures += 1
            if given and self._failures >= FREE_TRIES:
                lock = min(MAX_LOCK_S, FIRST_LOCK_S * 2 ** (self._failures - FREE_TRIES))
                self._locked_until = now + lock
        raise NotAllowed("this action changes the model or the data: enter the admin password"
                         + (" or sign in as an admin" if self.admins else ""))
