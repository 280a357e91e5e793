"""Optional API key: clients send ``Authorization: Bearer KEY``; the key is compared in constant time
(:func:`hmac.compare_digest`), so response timing does not reveal how much of a guess was right."""

from __future__ import annotations

import hmac
import os

from slimguard.core.errors import ConfigError
from slimguard.serve.limits import Problem


class ApiKey:
    """The key from ``$env_var`` (read once, at start-up), or no key at all when ``env_var`` is None.

    Raises:
        ConfigError: ``env_var`` is given but unset or empty (a service meant to be locked never starts open).
    """

    def __init__(self, env_var: str | None) -> None:
        self._key: bytes | None = None
        if env_var is not None:
            value = os.environ.get(env_var, "").strip()
            if not value:
                raise ConfigError(f"--api-key-env {env_var}: the environment variable {env_var} is unset or empty; "
                                  "export the API key in it")
            self._key = value.encode()

    @property
    def required(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> None:
        """Accept the request, or raise a 401 Problem."""
        if self._key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, self._key):
            raise Problem(401, "Unauthorized", "send a valid API key as 'Authorization: Bearer KEY'", "auth",
                          headers={"WWW-Authenticate": "Bearer"})
