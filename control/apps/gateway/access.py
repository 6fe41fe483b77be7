"""Who is calling and may they: API keys -> client ids, a token-bucket rate limit and a token quota per
client, and the usage ledger (tokens in and out) those are checked against.

State is in memory, since the gateway started: run one gateway per set of keys, or accept that limits are
per gateway process. Everything here runs on the gateway's event loop (one thread), so no locks.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from control.apps.gateway.errors import GatewayError
from control.gateway_settings import GatewaySettings

ANONYMOUS = "anonymous"


class TokenBucket:
    """``rate_per_minute`` requests per minute with bursts of up to a minute's worth."""

    def __init__(self, rate_per_minute: float, now: float | None = None) -> None:
        self.capacity = max(1.0, rate_per_minute)
        self.rate_per_s = rate_per_minute / 60.0
        self.tokens = self.capacity
        self.updated = time.monotonic() if now is None else now

    def take(self, now: float | None = None) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller and the limits that apply to it."""

    client_id: str
    requests_per_minute: float  # 0: unlimited
    token_quota: int  # 0: unlimited
    admin: bool = False


@dataclass(slots=True)
class ClientUsage:
    requests: int = 0
    rejected: int = 0  # refused by the rate limit or the quota
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _digest(key: str) -> bytes:
    # Keys are looked up by digest: no secret-dependent early exit in a string compare.
    return hashlib.sha256(key.encode()).digest()


@dataclass
class AccessControl:
    settings: GatewaySettings
    usage: dict[str, ClientUsage] = field(default_factory=dict)
    _keys: dict[bytes, Principal] = field(default_factory=dict)
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.settings
        for entry in s.api_keys:
            self._keys[_digest(entry.key)] = Principal(
                client_id=entry.client_id,
                requests_per_minute=s.requests_per_minute
                if entry.requests_per_minute is None
                else entry.requests_per_minute,
                token_quota=s.token_quota if entry.token_quota is None else entry.token_quota,
                admin=entry.admin,
            )

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of an ``Authorization`` header; 401 when keys are configured and it is not one."""
        if not self._keys:
            s = self.settings
            return Principal(ANONYMOUS, s.requests_per_minute, s.token_quota, admin=True)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GatewayError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        principal = self._keys.get(_digest(token.strip()))
        if principal is None:
            raise GatewayError(401, "incorrect API key provided", type="invalid_request_error", code="invalid_api_key")
        return principal

    def admit(self, principal: Principal) -> None:
        """Charge one request to the caller's rate limit and check its quota; 429 when either is spent."""
        usage = self.usage.setdefault(principal.client_id, ClientUsage())
        if principal.token_quota and usage.total_tokens >= principal.token_quota:
            usage.rejected += 1
            raise GatewayError(
                429,
                f"token quota of {principal.token_quota} exhausted for {principal.client_id}",
                type="insufficient_quota",
                code="insufficient_quota",
            )
        if principal.requests_per_minute:
            bucket = self._buckets.get(principal.client_id)
            if bucket is None:
                bucket = self._buckets[principal.client_id] = TokenBucket(principal.requests_per_minute)
            wait_s = bucket.take()
            if wait_s > 0:
                usage.rejected += 1
                raise GatewayError(
                    429,
                    f"rate limit of {principal.requests_per_minute:g} requests/min reached; retry in {wait_s:.1f}s",
                    type="requests",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
        usage.requests += 1

    def record(self, principal: Principal, prompt_tokens: int, completion_tokens: int) -> None:
        usage = self.usage.setdefault(principal.client_id, ClientUsage())
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens

    def report(self, principal: Principal) -> dict[str, Any]:
        """Usage as ``/v1/usage`` shows it: the caller's own, or every client's for an admin key."""
        if principal.admin:
            return {"object": "list", "data": [self._row(c, u) for c, u in sorted(self.usage.items())]}
        return self._row(principal.client_id, self.usage.get(principal.client_id, ClientUsage()), principal)

    def _row(self, client_id: str, usage: ClientUsage, principal: Principal | None = None) -> dict[str, Any]:
        quota = principal.token_quota if principal else self._quota_of(client_id)
        return {
            "object": "usage",
            "client_id": client_id,
            "requests": usage.requests,
            "rejected": usage.rejected,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "token_quota": quota or None,
            "remaining_tokens": max(0, quota - usage.total_tokens) if quota else None,
        }

    def _quota_of(self, client_id: str) -> int:
        quotas = [p.token_quota for p in self._keys.values() if p.client_id == client_id]
        return max(quotas) if quotas else self.settings.token_quota
