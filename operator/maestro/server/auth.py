"""Who is calling, and may they: Kubernetes decides (TokenReview, SubjectAccessReview).

The server acts with its own ServiceAccount only after the API server said the caller
could do the equivalent thing with kubectl, so it never widens anyone's rights. Answers
are cached for a few seconds (as the API server's own webhook authenticator does), so a
page of history does not cost two extra API round trips.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Hashable
from typing import Any

from maestro.k8s.client import Caller, Kube

#: What an unauthenticated request is, when anonymous access is on: RBAC still applies.
ANONYMOUS = Caller(
    username="system:anonymous", uid="", groups=("system:unauthenticated",), extra=()
)


class ApiError(Exception):
    """An HTTP error with a JSON body naming the field at fault (when there is one)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        """``field``: dotted path of the request part at fault (e.g. ``params.x``)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        """The response body."""
        error: dict[str, Any] = {"message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class _TTLCache:
    """A small time-bounded cache; emptied whole when it grows too big."""

    def __init__(self, ttl: float, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        self._items: dict[Hashable, tuple[float, Any]] = {}

    def get(self, key: Hashable) -> tuple[bool, Any]:
        hit = self._items.get(key)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def put(self, key: Hashable, value: Any) -> None:
        if len(self._items) >= self.size:
            self._items.clear()
        self._items[key] = (time.monotonic() + self.ttl, value)


class Authorizer:
    """Authenticates bearer tokens and checks actions, through the API server."""

    def __init__(self, kube: Kube, *, allow_anonymous: bool, cache_seconds: float) -> None:
        """``allow_anonymous``: requests without a token act as system:anonymous."""
        self.kube = kube
        self.allow_anonymous = allow_anonymous
        self._tokens = _TTLCache(cache_seconds)
        self._reviews = _TTLCache(cache_seconds)

    async def authenticate(self, authorization: str | None) -> Caller:
        """The caller of a request with this Authorization header; 401 otherwise."""
        if not authorization:
            if self.allow_anonymous:
                return ANONYMOUS
            raise ApiError(401, "a bearer token is required (Authorization: Bearer TOKEN)")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "the Authorization header must be 'Bearer TOKEN'")
        # Keyed by a hash: the cache never holds a usable token.
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        found, caller = self._tokens.get(key)
        if not found:
            caller = await self.kube.review_token(token)
            self._tokens.put(key, caller)
        if caller is None:
            raise ApiError(401, "the bearer token was not accepted by the Kubernetes API server")
        assert isinstance(caller, Caller)
        return caller

    async def require(
        self,
        caller: Caller,
        verb: str,
        namespace: str,
        *,
        resource: str = "workflowruns",
        group: str = "maestro.dev",
        subresource: str | None = None,
    ) -> None:
        """403 unless the API server lets ``caller`` do this (namespace "" = all)."""
        key = (caller, verb, namespace, resource, group, subresource)
        found, allowed = self._reviews.get(key)
        if not found:
            allowed = await self.kube.may(
                caller, verb, resource, namespace, group=group, subresource=subresource
            )
            self._reviews.put(key, allowed)
        if not allowed:
            what = f"{resource}/{subresource}" if subresource else resource
            where = f"in namespace {namespace!r}" if namespace else "in all namespaces"
            raise ApiError(403, f"{caller.username} may not {verb} {what} {where}")
