"""Settings of the OpenAI-compatible gateway (``[gateway]`` in the TOML file once ``Settings`` has it).

Every default is here, each documented. API keys map to client ids: usage, limits and metrics are kept per
client id, so several keys of one client share them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ApiKeySettings(_Section):
    """One accepted ``Authorization: Bearer <key>``."""

    key: str = Field(..., min_length=8, description="The secret; clients send it as a Bearer token.")
    client_id: str = Field(..., min_length=1, description="Who the key belongs to (usage, limits, metrics).")
    requests_per_minute: float | None = Field(
        None, ge=0, description="Rate limit of this client; None: the gateway default; 0: unlimited."
    )
    token_quota: int | None = Field(
        None, ge=0, description="Prompt + completion tokens this client may use; None: the default; 0: unlimited."
    )
    admin: bool = Field(False, description="May read every client's usage on /v1/usage.")


class GatewaySettings(_Section):
    host: str = Field("127.0.0.1", description="Bind address; loopback unless you mean to expose it.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP(S) port (vLLM's OpenAI server uses 8000 too).")
    api_keys: list[ApiKeySettings] = Field(
        [], description="Accepted keys. Empty: no authentication, every caller is client 'anonymous'."
    )
    requests_per_minute: float = Field(
        0.0, ge=0, description="Default per-client rate limit (token bucket, burst = one minute); 0: unlimited."
    )
    token_quota: int = Field(
        0, ge=0, description="Default per-client token quota since the gateway started; 0: unlimited."
    )
    ssl_certfile: str | None = Field(None, description="PEM certificate: serve HTTPS when set with ssl_keyfile.")
    ssl_keyfile: str | None = Field(None, description="PEM private key of ssl_certfile.")
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens of a chat completion that sets none (OpenAI: up to the context)."
    )
    models_cache_s: float = Field(
        2.0, ge=0, description="How long the model list from the cluster's status is reused before asking again."
    )
    nats_connect_timeout_s: float = Field(5.0, gt=0, description="Give up starting when NATS is not reachable.")
    cancel_timeout_s: float = Field(5.0, gt=0, description="Timeout of the cancel sent when a client goes away.")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics on /metrics of the gateway.")
    client_name: str = Field("drover-gateway", description="NATS connection name of the gateway.")
    request_deadline_s: float = Field(
        600.0,
        ge=0,
        description="Drover ends a request that has not finished this long after it arrived (504 if nothing "
        "was sent yet), so a completion never waits forever, e.g. while every instance is drained; 0: none.",
    )

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("set both ssl_certfile and ssl_keyfile for HTTPS, or neither")
        keys = [k.key for k in self.api_keys]
        if len(keys) != len(set(keys)):
            raise ValueError("api_keys has the same key twice")
        return self

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None
