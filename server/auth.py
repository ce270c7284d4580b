"""API keys to users."""

from __future__ import annotations

import hmac

from server.config import Settings
from server.schemas import RequestError

SINGLE_USER = "local"


class Authenticator:
    """Maps a bearer key to its user. With no keys configured every caller is ``local``."""

    def __init__(self, settings: Settings) -> None:
        self._keys = dict(settings.api_keys)

    @property
    def single_user(self) -> bool:
        return not self._keys

    def user_for(self, authorization: str | None, token: str | None = None) -> str:
        """The user of an ``Authorization`` header or a ``?token=``; raises 401."""
        if self.single_user:
            return SINGLE_USER
        key = token
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                key = value.strip()
        if not key:
            raise RequestError(401, "unauthorized", "Missing API key (Authorization: Bearer).")
        # Compare against every key in constant time, so timing tells nothing of the keys.
        found: str | None = None
        for candidate, user in self._keys.items():
            if hmac.compare_digest(candidate.encode(), key.encode()):
                found = user
        if found is None:
            raise RequestError(401, "unauthorized", "Invalid API key.")
        return found
