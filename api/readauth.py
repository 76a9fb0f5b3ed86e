"""Read authentication: with users configured, every route but the health probe needs them.

The users and their bcrypt hashes come from the web config (``api.webconfig``), as for
Prometheus' exporters. A request passes with HTTP basic credentials of a configured user, or
with the bearer token that also guards balloon changes (its holder may change VMs, so it may
read them). The probe stays open so health checks need no secret.

bcrypt is slow on purpose (cost 10 takes some 70 ms of CPU), so as in exporter-toolkit checks
run one at a time, off the event loop, and each (user, password) outcome is cached: a scrape
every 15 s costs one bcrypt at start, and someone guessing passwords gets one core at most,
never the event loop. An unknown user is checked against a hash of the same cost, so timing
does not tell which users exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
from collections import OrderedDict
from collections.abc import Collection, Mapping

import bcrypt
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from api.problems import problem

# Paths that never need credentials: the liveness and readiness probes.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Outcomes remembered; a few users and their clients need a handful, guessing needs none.
CACHE_ENTRIES = 256
CHALLENGE = {"WWW-Authenticate": 'Basic realm="reclaimd", charset="UTF-8"'}


class PasswordCheck:
    """Checks user and password against bcrypt hashes, one bcrypt at a time, cached."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self._users = dict(users)
        cost = max((int(h.split(b"$")[2]) for h in self._users.values()), default=10)
        # Unknown users are checked against this, at the configured users' cost.
        self._decoy = bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(rounds=cost))
        self._key = os.urandom(32)  # cache keys are unguessable digests, never passwords
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._lock = asyncio.Lock()

    async def check(self, user: str, password: str) -> bool:
        hashed = self._users.get(user)
        known = hashed is not None
        hashed = hashed if hashed is not None else self._decoy
        material = b"\0".join((user.encode(), hashed, password.encode()))
        digest = hmac.new(self._key, material, "sha256").digest()
        outcome = self._cache.get(digest)
        if outcome is None:
            async with self._lock:
                # Requests with the same credentials queue here: the first one's answer serves all.
                outcome = self._cache.get(digest)
                if outcome is None:
                    outcome = await asyncio.to_thread(_bcrypt_matches, password.encode(), hashed)
                    self._cache[digest] = outcome
                    while len(self._cache) > CACHE_ENTRIES:
                        self._cache.popitem(last=False)
        self._cache.move_to_end(digest)
        return known and outcome


def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # over bcrypt's 72 bytes: no such password can match
        return False


class ReadAuth:
    """ASGI middleware: refuse (401) any request outside :data:`OPEN_PATHS` without valid
    basic credentials or the bearer token."""

    def __init__(
        self,
        app: ASGIApp,
        users: Mapping[str, bytes],
        token: SecretStr | None,
        open_paths: Collection[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.passwords = PasswordCheck(users)
        self.token = token.get_secret_value().encode() if token is not None else None
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        if await self._valid(authorization):
            await self.app(scope, receive, send)
            return
        response = problem(
            401,
            "credentials required: basic authentication of a configured user",
            instance=scope["path"],
            headers=CHALLENGE,
        )
        await response(scope, receive, send)

    async def _valid(self, authorization: bytes) -> bool:
        scheme, _, value = authorization.partition(b" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == b"bearer":
            return self.token is not None and hmac.compare_digest(value, self.token)
        if scheme != b"basic":
            return False
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        return bool(sep) and await self.passwords.check(user, password)


def is_open(path: str) -> bool:
    """Whether ``path`` is served without credentials when read authentication is on."""
    return path in OPEN_PATHS
