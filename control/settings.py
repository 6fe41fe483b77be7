"""One settings model for every Drover default.

Sources, lowest to highest precedence: the defaults below, a TOML file (``--config`` or ``DROVER_CONFIG``),
environment variables (``DROVER_<SECTION>__<FIELD>``, e.g. ``DROVER_NATS__URL``), then CLI flags
(applied by the CLI through :func:`load_settings` overrides). Each field says where its default comes from.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from control.errors import ConfigError
from control.gateway_settings import GatewaySettings
from control.policy.autoscaling import AutoscaleParams, ThresholdParams
from control.policy.params import PolicyParams
from control.policy.pd import PdParams
from observability.metrics import MetricsSettings
from transport.nats_auth import NatsAuth

# The live policy defaults are the simulator's: one set (PolicyParams documents the measured migration knobs).
LIVE_POLICY_DEFAULTS = PolicyParams()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class NatsSettings(_Section):
    url: str | None = Field(
        None, description="NATS server URL(s), comma-separated. None: start an embedded nats-server."
    )
    embedded_host: str = Field("127.0.0.1", description="Bind address of the embedded server (loopback).")
    embedded_jetstream: bool = Field(True, description="Enable JetStream in the embedded server.")
    max_payload_bytes: int = Field(
        8 * 1024 * 1024, description="Embedded server max_payload; NATS docs advise <= 8 MB."
    )
    connect_timeout_s: float = Field(5.0, description="Connect timeout for nats-py.")
    request_timeout_s: float = Field(5.0, description="Default timeout of a request/reply on the bus.")
    user: str | None = Field(None, description="NATS user name (with password).")
    password: str | None = Field(None, description="NATS password.")
    creds_file: str | None = Field(None, description="NATS credentials file (nkeys/JWT).")
    nkey_seed_file: str | None = Field(
        None, description="File holding this process's NATS user nkey seed (`drover nats config` writes them)."
    )
    tls_ca_file: str | None = Field(None, description="CA bundle to verify the NATS server's TLS cert.")
    tls_cert_file: str | None = Field(None, description="Client TLS certificate (servers that verify clients).")
    tls_key_file: str | None = Field(None, description="Private key of tls_cert_file.")
    tls_hostname: str | None = Field(
        None, description="Name to verify in the server certificate when it differs from the URL's host."
    )
    client_id: str | None = Field(
        None,
        description="Client id of this process's NATS user: its inbox is drover.v1.inbox.<client_id>, the only "
        "one its permissions let it read. None: derived from the connection name (servers without auth).",
    )
    secure: bool = Field(
        False,
        description="`drover up` starts the embedded server with generated per-role credentials and subject "
        "permissions (transport/nats_auth.py) and hands each component its role's credentials.",
    )
    secure_dir: str = Field(
        ".drover/nats-auth",
        description="Where `drover control serve` (embedded server, secure) writes the generated credentials; "
        "`drover up` uses <work dir>/nats-auth.",
    )
    secure_auth: Literal["nkey", "password"] = Field(
        "nkey", description="Kind of generated credentials: nkeys (the server keeps public keys only) or passwords."
    )
    reconnect_wait_s: float = Field(
        0.25,
        description="Pause before retrying the same server after a lost connection (nats-py's default is 2 s; "
        "Drover reconnects forever and moves to the next server of a cluster at once, so a short pause "
        "keeps a one-node restart to well under a second of silence).",
    )
    ping_interval_s: float = Field(
        2.0,
        description="Client-to-server ping period; with max_outstanding_pings unanswered pings a hung server "
        "(SIGSTOP, a cut link) is left for another node after about ping_interval_s * (pings + 1) "
        "(nats-py's default 120 s would hide a hung node for minutes).",
    )
    max_outstanding_pings: int = Field(2, description="Unanswered pings before the connection counts as lost.")
    reply_user: str | None = Field(
        None,
        description="Control plane only: NATS user of its client-bound connection (publishes only to client "
        "inboxes; `drover nats config` makes `control-reply`). None: replies go over the main connection.",
    )
    reply_password: str | None = Field(None, description="Password of reply_user.")
    reply_nkey_seed_file: str | None = Field(None, description="Nkey seed file of the client-bound user.")
    embedded_cluster_size: int = Field(
        1,
        description="Nodes of the embedded NATS (1: one server; 3: a routed cluster with clustered JetStream, "
        "the supported production shape, on loopback).",
    )

    def auth(self) -> NatsAuth:
        """The authentication and TLS part, as the bus and the client library take it."""
        return NatsAuth(
            user=self.user,
            password=self.password,
            nkey_seed_file=self.nkey_seed_file,
            creds_file=self.creds_file,
            tls_ca_file=self.tls_ca_file,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            tls_hostname=self.tls_hostname,
        )

    def reply_auth(self) -> NatsAuth | None:
        """The control plane's client-bound user (same TLS settings), or None when none is configured."""
        if not (self.reply_user or self.reply_nkey_seed_file):
            return None
        return NatsAuth(
            user=self.reply_user,
            password=self.reply_password,
            nkey_seed_file=self.reply_nkey_seed_file,
            tls_ca_file=self.tls_ca_file,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            tls_hostname=self.tls_hostname,
        )


class ModelSettings(_Section):
    path: str | None = Field(
        None, description="Hugging Face model directory. None: the generated tiny model (built once, cached)."
    )
    name: str = Field("drover-tiny", description="Model name engines advertise and requests may name.")
    cache_dir: str = Field(str(Path.home() / ".cache" / "drover"), description="Where generated models are cached.")
    max_model_len: int = Field(2048, description="Context length of an instance (prompt + output).")
    dtype: str = Field("float32", description="Engine dtype; float32 keeps greedy output exact on CPU.")


class EngineSettings(_Section):
    kind: Literal["vllm", "sim", "torch"] = Field(
        "vllm", description="Engine implementation: vllm (CPU/GPU), sim (cost model), torch (layer-range engine)."
    )
    block_size: int = Field(32, description="KV block size in tokens; vLLM-CPU needs a multiple of 32.")
    max_num_seqs: int = Field(16, description="Max requests decoding at once (vLLM max_num_seqs).")
    max_num_batched_tokens: int = Field(2048, description="Token budget of one engine step.")
    kv_cache_gib: float = Field(0.25, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE), GiB.")
    cpu_threads: int = Field(1, description="Torch threads per engine; CI has 2 cores for everything.")
    heartbeat_interval_s: float = Field(0.25, description="How often an engine publishes its load.")
    drain_timeout_s: float = Field(
        120.0, description="On SIGTERM an engine drains (its requests migrate away) for at most this long."
    )
    sim_num_blocks: int = Field(512, description="KV blocks of a simulated instance.")
    sim_time_scale: float = Field(1.0, description="Simulated engines in live mode: wall seconds per modelled second.")
    sim_prefix_caching: bool = Field(
        False, description="Simulated engines model vLLM's prefix caching and report it in heartbeats (kv_aware)."
    )
    seed: int = Field(0, description="Sampling seed passed to engines.")
    role: Literal["interactive", "mixed", "batch"] = Field(
        "mixed",
        description="Instance role (Chiron): interactive, batch, or mixed (serves both, interactive first). "
        "Mixed by default so that an engine started by hand serves every request class.",
    )
    local_autoscaler: bool = Field(
        False,
        description="Run the local autoscaler (Chiron's lower level): an admission limit on requests running "
        "at once, adapted to the ITL SLO ([autoscaling.local]), reported in heartbeats. Off by default so a "
        "hand-started engine admits as vLLM does; the autoscaler's provisioner turns it on.",
    )
    device: str = Field(
        "cpu", description="Torch engines: where weights and KV live and steps compute (cpu, cuda, cuda:1)."
    )
    phase: Literal["prefill", "decode", "both"] = Field(
        "both",
        description="Prefill/decode disaggregation ([pd]): the phase this instance serves, reported in its "
        "heartbeats; `drover phase set` overrides it live.",
    )
    step_budget_slo_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="SLO-sized step budget (docs/policies.md): at start-up the engine's token budget per step "
        "becomes the largest (at most max_num_batched_tokens) whose step of prompt tokens alone takes at most "
        "this share of [autoscaling.slo] itl_s, by the engine's step profile (a sim engine's cost model; vLLM "
        "and torch: the tiny model's CPU fit, engines/sim/cost_model.py TINY_CPU). 0: off.",
    )
    step_budget_adaptive: bool = Field(
        False,
        description="With step_budget_slo_share > 0: the SLO-sized budget only under pressure, chosen per step "
        '(docs/policies.md, "Adaptive step budget"): max_num_batched_tokens while fewer than 1 % of recent '
        "decode gaps would carry a full-budget chunk. Sim and vLLM engines (torch: the SLO-sized budget).",
    )


class SchedulerSettings(_Section):
    instance_stale_after_s: float = Field(
        5.0,
        description="An instance whose last heartbeat is older is declared dead: no more dispatches, and "
        "its requests fail over (engines beat every 0.25 s from a thread of their own; 5 s holds on a "
        "loaded 2-core machine while another engine starts).",
    )
    max_queued_requests: int = Field(
        1024, description="Requests held when no instance can take them; beyond: Overloaded."
    )
    fairness: bool = Field(
        False,
        description="Fair share between clients (control/policy/fairness.py, docs/security.md): requests wait "
        "here, served by deficit round robin by tokens per authenticated identity, and each instance gets at "
        "most fairness_max_waiting waiting ones, so one client's backlog cannot hold another's requests.",
    )
    fairness_quantum_tokens: int = Field(
        1024, ge=1, description="Tokens (prompt + max_tokens) a client may dispatch per round-robin turn."
    )
    fairness_max_waiting: int = Field(
        1, ge=0, description="With fairness: requests an instance may have waiting (beyond its running batch)."
    )


class MigrationSettings(_Section):
    """How the MigratorActor runs a migration; *when* to migrate is policy (``[policy]``)."""

    op_timeout_s: float = Field(30.0, description="Timeout of one migration step (a stage copy, stop, resume).")
    reserve_headroom_blocks: int = Field(
        2, description="Extra blocks reserved at the destination for tokens decoded during the copy."
    )
    reserve_decoded_factor: float = Field(
        2.0,
        ge=0,
        description="On top of the headroom, reserve this many times the blocks the request wrote during the "
        "migration's last round (a fast decoder outruns a fixed headroom between a report and the next copy).",
    )
    fault_stage: Literal["", "before_reserve", "mid_copy", "stop_and_copy", "commit"] = Field(
        "",
        description="Fault injection for tests and the chaos benchmark: abort migrations at this stage "
        "(before reserve, after the first copy stage, right after stop-and-copy, or by losing the commit). "
        "Empty (the default): no faults.",
    )
    fault_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="Fraction of migrations fault_stage aborts (chaos runs use less than 1)."
    )


class MemorySettings(_Section):
    """KunServe parameter-centric memory (control/policy/memory.py documents the policy and its sources)."""

    auto: bool = Field(
        True,
        description="Let the scheduler form groups on its own when the drop trigger fires (torch engines only; "
        "`drover memory drop|restore` works either way).",
    )
    drop_memory_use: float = Field(0.95, description="KV-pool occupancy that votes to drop (KunServe code: 95 %).")
    restore_memory_use: float = Field(
        0.50, description="A group restores at or below this occupancy, falling, nothing pending (KunServe: 50 %)."
    )
    max_group_size: int = Field(
        4, description="Largest group; the policy picks the smallest g whose freed memory covers the queue."
    )
    pipeline_overhead_per_stage: float = Field(
        0.05, description="Modelled slowdown per extra pipeline stage (assumption; see MemoryParams)."
    )
    max_pipeline_overhead: float = Field(0.25, description="Never form a group whose modelled overhead exceeds this.")
    min_group_s: float = Field(
        1.0, description="A group lives at least this long before an automatic restore (avoids flapping; ours)."
    )
    cooldown_s: float = Field(
        2.0, description="An instance that left a group is not grouped again automatically for this long (ours)."
    )
    op_timeout_s: float = Field(120.0, description="Timeout of one group step on an engine (drop, exchange, restore).")
    micro_batches: int = Field(
        0,
        description="Micro-batches a group's pipeline cuts each step into, so stages compute at once (KunServe "
        "keeps every stage busy with micro-batches); 0: one per stage.",
    )


class ReliabilitySettings(_Section):
    output_retention_s: float = Field(
        600.0, description="How long the output stream keeps what clients were sent (failover, resume)."
    )
    output_max_bytes: int = Field(256 * 1024 * 1024, description="Bound of the output stream (oldest dropped).")
    failover_max_attempts: int = Field(
        3, description="Times a request is resumed elsewhere after engine failures before it fails."
    )
    output_replicas: int = Field(
        1,
        description="JetStream replicas of the output stream: 1 for one NATS node, 3 on a 3-node cluster (the "
        "stream then survives a node loss with what clients were sent).",
    )
    output_read_retry_s: float = Field(
        10.0,
        description="How long failover keeps trying to read a dead engine's delivered tokens from the output "
        "stream before failing the request (a NATS node loss elects a new stream leader within seconds).",
    )
    resend_window_s: float = Field(
        30.0,
        description="After its NATS connection comes back, an engine re-sends what it streamed to clients in "
        "this window (running requests and those finished this recently); clients drop what they have by "
        "index. Covers chunks lost with a NATS node that died holding them.",
    )
    failover_fence_timeout_s: float = Field(
        2.0,
        description="Before a failover reads back what a client was sent, the instance declared dead is told to "
        "stop the request (a live but late one would stream on: duplicate tokens); wait this long for its answer "
        "(a dead one: NATS answers no-responders at once, or the wait times out). Drover's choice.",
    )


class HaSettings(_Section):
    """Control-plane high availability: durable control state and a leader lease (README: control-plane HA)."""

    enabled: bool = Field(
        True,
        description="Keep the request table and instance registry in a JetStream KV bucket and elect one "
        "leader by lease; off: a single control plane with in-memory state (needs no JetStream).",
    )
    state_bucket: str = Field("drover_control", description="KV bucket of the request table and instance registry.")
    state_memory: bool = Field(
        False, description="Keep the state bucket in memory (faster) instead of on the NATS server's disk."
    )
    lease_bucket: str = Field(
        "drover_leader", description="KV bucket of the leader lease (memory storage; its TTL is lease_ttl_s)."
    )
    lease_ttl_s: float = Field(
        3.0,
        description="A leader that has not renewed for this long is replaced; a standby takes over at most "
        "ttl + renew period after the last renewal (Drover's choice: below the 5 s engine-failure timeout).",
    )
    renew_period_s: float = Field(
        1.0, description="How often the leader renews its lease and a standby polls it (a third of the TTL)."
    )
    replicas: int = Field(1, description="JetStream replicas of both buckets (3 on a 3-node NATS cluster).")
    wait_for_leadership_s: float = Field(
        0.0,
        description="How long `start` waits to become leader before returning as a standby (0: do not wait; "
        "a standby keeps trying in the background).",
    )


class LimitsSettings(_Section):
    max_prompt_tokens: int = Field(0, description="Largest prompt accepted; 0 means the instances' max_model_len - 1.")
    max_new_tokens: int = Field(4096, description="Largest max_tokens a request may ask for.")
    max_message_bytes: int = Field(4 * 1024 * 1024, description="Submissions larger than this are refused.")
    max_queued_interactive: int = Field(
        512,
        description="Interactive requests waiting for an instance; beyond: Overloaded at once (Drover's choice: "
        "half of scheduler.max_queued_requests, so a batch flood cannot take all queue slots).",
    )
    max_queued_batch: int = Field(
        512, description="Batch requests waiting for an instance; beyond: Overloaded at once (as interactive)."
    )
    max_in_flight_per_client: int = Field(
        256,
        description="Admitted, unfinished requests of one client (client_id, else its inbox prefix); beyond: "
        "Overloaded. Drover's choice: 16 engines x max_num_seqs 16, one client cannot fill the cluster alone.",
    )
    max_in_flight_requests: int = Field(
        4096,
        description="Admitted, unfinished requests in all (the request table's bound; engines' waiting queues "
        "are bounded by it); beyond: Overloaded. Drover's choice: 8x a 32-instance cluster of 16 seqs each.",
    )
    max_deadline_s: float = Field(
        3600.0, description="Largest deadline_s a request may ask for; larger is InvalidRequest."
    )
    per_identity_max_in_flight: dict[str, int] = Field(
        default_factory=dict,
        description="max_in_flight_per_client for named identities (the NATS user's client id, which the "
        "control plane reads from the subject, docs/security.md), e.g. {batch-team = 1024, trial = 4}.",
    )
    max_queued_per_client: int = Field(
        256,
        ge=1,
        description="Requests of one client (as max_in_flight_per_client counts them) waiting for an instance, in "
        "the waiting queue or the fair queue; beyond: Overloaded at once. Drover's choice: a quarter of "
        "scheduler.max_queued_requests, so one client (even one with a raised per_identity_max_in_flight) "
        "cannot fill the shared queue alone.",
    )


class LifecycleSettings(_Section):
    """Deadlines, clients that go away, and how long finished requests are remembered."""

    probe_period_s: float = Field(
        1.0,
        description="How often the scheduler probes the inbox of each request that asked for liveness "
        "(one NATS request per request per period; Drover's choice, cheap next to the token stream).",
    )
    probe_timeout_s: float = Field(
        0.5, description="A probe unanswered this long counts as no answer (no-responders answers at once)."
    )
    client_gone_after_s: float = Field(
        3.0,
        description="A request whose client answered no probe for this long is aborted (CLIENT_GONE), freeing "
        "its blocks: three probe periods, so one lost probe does not kill a request.",
    )
    finished_retention_s: float = Field(
        300.0,
        description="Finished request ids stay known this long: a retry of one gets DUPLICATE_REQUEST instead of "
        "running again. Half of reliability.output_retention_s, so its tokens can still be read back.",
    )
    finished_max_entries: int = Field(
        100_000, description="At most this many finished ids are remembered (oldest forgotten first)."
    )


class ObservabilitySettings(_Section):
    exporter: Literal["none", "console", "jsonl", "otlp"] = Field(
        "jsonl", description="Span exporter: none, console, JSON lines file, or OTLP over HTTP."
    )
    jsonl_path: str = Field(".drover/traces.jsonl", description="File the jsonl exporter appends to.")
    otlp_endpoint: str = Field(
        "http://127.0.0.1:6006/v1/traces", description="OTLP/HTTP traces endpoint (Phoenix default)."
    )
    ship_to_control: bool = Field(
        False,
        description="Engines and the gateway also publish their finished spans on drover.v1.spans; the "
        "control plane appends them to its jsonl_path, so `drover trace` works across hosts (issue #9).",
    )
    service_name: str = Field("drover", description="OpenTelemetry service.name prefix.")
    log_level: str = Field("INFO", description="Python log level.")


class AuditSettings(_Section):
    path: str = Field(
        ".drover/audit.jsonl",
        description="JSON-lines file the control plane appends every admin action to (who, what, when, result); "
        "empty: the log only.",
    )
    operator: str = Field("", description="Identity the CLI puts in admin commands; empty: the OS user running it.")
    reply_timeout_s: float = Field(
        600.0,
        description="An admin command with no answer after this long is audited as 'no reply' (a live "
        "migration answers when it commits; 600 s is far beyond any measured one).",
    )


class SupervisorSettings(_Section):
    restart_backoff_initial_s: float = Field(0.1, description="First restart delay of a failed actor.")
    restart_backoff_max_s: float = Field(5.0, description="Cap of the exponential restart delay.")
    max_restarts: int = Field(10, description="Restarts within restart_window_s before giving up.")
    restart_window_s: float = Field(60.0, description="Window over which max_restarts is counted.")


class AutoscalerSettings(_Section):
    """The live AutoscalerActor; its policy parameters are ``[autoscaling]``."""

    enabled: bool = Field(
        False,
        description="Run the periodic scaling decisions. Off by default (`drover up` demo, tests with fixed "
        "fleets); `drover scale` and `drover autoscale status` work either way.",
    )
    provisioner: Literal["local"] = Field(
        "local", description="How instances are started: local processes (`drover engine serve`)."
    )
    engine_kind: Literal["vllm", "sim", "torch"] | None = Field(
        None, description="Engine kind of instances the provisioner starts; None: [engine] kind."
    )
    work_dir: str = Field(".drover/autoscaler", description="Config file and logs of provisioned engine processes.")
    instance_prefix: str = Field("auto", description="Provisioned instances are named <prefix>-<role>-<n>.")
    class_dispatch: bool | None = Field(
        None,
        description="Class-aware dispatch (Chiron): batch requests wait in a global queue and fill batch and "
        "mixed instances' spare slots; interactive requests go to interactive instances first. None: on "
        "exactly when the autoscaler is enabled.",
    )
    startup_ewma: float = Field(
        0.5, description="Weight of a new start-up measurement in the start-up time estimate (Drover's choice)."
    )
    stop_timeout_s: float = Field(60.0, description="SIGTERM to SIGKILL grace when stopping a drained instance.")
    drain_timeout_s: float = Field(
        300.0, description="A draining instance still busy after this long is stopped anyway (its requests fail over)."
    )
    events_kept: int = Field(50, description="Scale events `drover autoscale status` shows.")


class RayShape(_Section):
    """What one engine instance of a role asks Ray for; Ray places the instance on a node that has it."""

    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs held by the instance (Ray's num_cpus).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs held by the instance (Ray's num_gpus).")
    memory_gib: float = Field(0.0, ge=0, description="Memory reserved for the instance, GiB; 0: none.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description='Custom Ray resources, e.g. a node label such as {"node_a100" = 0.001} or an engine '
        'kind slot such as {"drover_engine" = 1}.',
    )


def _default_ray_shapes() -> dict[Literal["interactive", "mixed", "batch"], RayShape]:
    return {role: RayShape() for role in ("interactive", "mixed", "batch")}


class ProvisionerSettings(_Section):
    """Where the autoscaler's instances run: ``local`` processes or actors on a Ray cluster (``ray``)."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: `drover engine serve` processes here; ray: one Ray actor per instance."
    )
    ray_address: str = Field(
        "auto",
        description="Ray cluster: ray://HEAD:10001 (Ray Client; a control plane outside the cluster, e.g. "
        "KubeRay), HOST:PORT (the GCS, from a Ray node), or auto (the node this process runs on).",
    )
    ray_namespace: str = Field("drover", description="Ray namespace of the instances' named actors.")
    engine_nats_url: str | None = Field(
        None, description="NATS URL as engines on the Ray nodes reach it; None: [nats] url."
    )
    ray_scheduling: Literal["spread", "default"] = Field(
        "spread",
        description="spread: Ray's SPREAD strategy, so a lost node takes as few engines as possible "
        "(Drover's choice); default: Ray's packing-first hybrid policy.",
    )
    ray_shapes: dict[Literal["interactive", "mixed", "batch"], RayShape] = Field(
        default_factory=_default_ray_shapes,
        description="Resource shape per role (interactive, mixed, batch); a role not listed asks for 1 CPU.",
    )
    ray_poll_s: float = Field(
        0.5, gt=0, description="How often the provisioner's thread checks its Ray actors for exits."
    )
    ray_stop_on_close: bool = Field(
        True,
        description="Stop the instances when the control plane shuts down. false: leave them serving; the next "
        "leader adopts them (named <instance_prefix>-<role>-<n> in ray_namespace), e.g. across a rolling update "
        "of a replicated control plane.",
    )


class DemoSettings(_Section):
    instances: int = Field(2, description="Engine instances `drover up` starts.")
    requests: int = Field(16, description="Requests the demo workload submits.")
    max_tokens: int = Field(32, description="Tokens each demo request generates.")
    concurrency: int = Field(8, description="Demo requests in flight at once.")


class Settings(BaseSettings):
    """Every Drover setting; sections map to TOML tables and ``DROVER_<SECTION>__<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="DROVER_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    nats: NatsSettings = NatsSettings()
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    policy: PolicyParams = Field(
        LIVE_POLICY_DEFAULTS,
        description="Dispatch and migration policy knobs (control/policy/params.py documents each); "
        "changeable at run time with `drover policy set`.",
    )
    autoscaling: AutoscaleParams = Field(
        AutoscaleParams(),
        description="Hierarchical SLO-aware autoscaler (Chiron): SLOs, local batch limits, per-role min/max, "
        "hysteresis and cooldowns; control/policy/autoscaling.py documents each default and its source.",
    )
    threshold_autoscaling: ThresholdParams = Field(
        ThresholdParams(), description="Llumnix's avg-freeness threshold autoscaler (baseline)."
    )
    autoscaler: AutoscalerSettings = AutoscalerSettings()
    migration: MigrationSettings = MigrationSettings()
    memory: MemorySettings = MemorySettings()
    reliability: ReliabilitySettings = ReliabilitySettings()
    ha: HaSettings = HaSettings()
    limits: LimitsSettings = LimitsSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    demo: DemoSettings = DemoSettings()
    gateway: GatewaySettings = GatewaySettings()
    metrics: MetricsSettings = MetricsSettings()
    audit: AuditSettings = AuditSettings()
    provisioner: ProvisionerSettings = ProvisionerSettings()
    pd: PdParams = Field(
        PdParams(),
        description="Prefill/decode disaggregation: mode = off | disaggregated | adaptive, "
        "adaptive_min_prompt_tokens; control/policy/pd.py documents each.",
    )

    @model_validator(mode="after")
    def _check_policy(self) -> Settings:
        self.policy.validate()
        self.autoscaling.validate()
        self.pd.validate()
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Init kwargs carry CLI flags merged over the TOML file (see load_settings); env sits between.
        return (init_settings, env_settings)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides() -> dict[str, Any]:
    """Environment values as a nested dict, so they override file values field by field."""
    nested: dict[str, Any] = {}
    for key, value in os.environ.items():
        if not key.startswith("DROVER_") or key == "DROVER_CONFIG" or "__" not in key:
            continue
        section, _, field = key.removeprefix("DROVER_").lower().partition("__")
        nested.setdefault(section, {})[field] = value
    return nested


class SettingsError(ConfigError, ValueError):
    """Settings that cannot be loaded; the message is one line naming the setting and where it came from."""

    default_code = "bad_settings"


def _source_of(
    loc: tuple[Any, ...],
    path: str | Path | None,
    file_values: dict[str, Any],
    env: dict[str, Any],
    flags: dict[str, Any],
) -> str:
    """Where the value at ``loc`` came from (flag, environment variable, file), for an error message."""

    def has(values: dict[str, Any]) -> bool:
        node: Any = values
        for key in loc[:2]:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return bool(loc)

    if has(flags):
        return "from a command-line flag"
    if has(env):
        fields = [str(loc[1])] if len(loc) > 1 else list(env[loc[0]])
        return "from " + ", ".join(f"$DROVER_{str(loc[0]).upper()}__{f.upper()}" for f in fields)
    if has(file_values):
        return f"in {path}"
    return "default"


def _describe(
    exc: ValidationError,
    path: str | Path | None,
    file_values: dict[str, Any],
    env: dict[str, Any],
    flags: dict[str, Any],
) -> str:
    parts = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        name = ".".join(str(k) for k in loc) or "settings"
        source = _source_of(loc, path, file_values, env, flags)
        if error["type"] == "extra_forbidden":
            parts.append(f"unknown setting {name} ({source})")
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        secret = any(word in name for word in ("key", "password", "token", "secret"))
        shown = loc and not secret and not isinstance(error.get("input"), dict)  # never echo a credential
        value = f" = {error['input']!r}" if shown else ""
        parts.append(f"bad setting {name}{value} ({source}): {message}")
    return "; ".join(parts)


def load_settings(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the effective settings: defaults < TOML file < environment < ``overrides`` (CLI flags).

    ``overrides`` is nested by section, e.g. ``{"nats": {"url": "nats://..."}}``; None values are ignored.
    Raises :class:`SettingsError` (one line: which setting, from where, why) for a missing or broken file or
    a bad value.
    """
    path = config_file or os.environ.get("DROVER_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as handle:
                file_values = tomllib.load(handle)
        except FileNotFoundError:
            raise SettingsError(f"settings file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from None
    flag_values = {
        section: {k: v for k, v in fields.items() if v is not None} for section, fields in (overrides or {}).items()
    }
    env = _env_overrides()
    merged = _deep_merge(_deep_merge(file_values, env), flag_values)
    # Policy values override field by field on top of Drover's live defaults (a dataclass, not a section).
    merged = _deep_merge({"policy": LIVE_POLICY_DEFAULTS.as_dict()}, merged)
    try:
        return Settings(**merged)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, path, file_values, env, flag_values)) from None


def dump_toml(settings: Settings) -> str:
    """The settings as a TOML document (None values omitted), loadable by :func:`load_settings`."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list | tuple):  # e.g. [[gateway.api_keys]] as an array of inline tables
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k} = {scalar(v)}" for k, v in value.items() if v is not None) + "}"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []
    for section, fields in settings.model_dump(mode="json").items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {scalar(value)}" for key, value in fields.items() if value is not None)
        lines.append("")
    return "\n".join(lines)
