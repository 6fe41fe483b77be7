"""Drover's metrics: OpenTelemetry instruments exported in Prometheus text format.

One :class:`Metrics` per process (``metrics()``), on its own ``MeterProvider`` and Prometheus
``CollectorRegistry``, so tests and embedded clusters never fight over globals. The OpenTelemetry
Prometheus exporter (``opentelemetry-exporter-prometheus``) turns ``drover.ttft`` with unit ``s`` into
``drover_ttft_seconds`` and counters into ``*_total``, following Prometheus naming conventions.
Serve it with :func:`start_metrics_server` (its own thread) or render it into any HTTP handler.

Names (labels in braces):

- cluster request path: ``drover_requests_total{outcome,request_class}``, ``drover_ttft_seconds{request_class}``,
  ``drover_inter_token_seconds{request_class}``, ``drover_tokens_total{kind,request_class}``
- engines (from their events on the bus): ``drover_engine_requests_total{instance,finish_reason}`` (a
  ``migrated`` finish is a request leaving its source instance)
- migrations: ``drover_migrations_total{outcome}``, ``drover_migration_bytes_total``,
  ``drover_migration_downtime_seconds``
- instances and queue: ``drover_instance_free_blocks{instance}``, ``drover_instance_total_blocks{instance}``,
  ``drover_instance_running_requests{instance}``, ``drover_instance_waiting_requests{instance}``,
  ``drover_instance_dispatched_total{instance}``, ``drover_instances{state}``, ``drover_queue_depth``,
  ``drover_requests_in_flight``, ``drover_migrations_in_flight``,
  ``drover_scheduler_migrations_total{outcome}`` (the scheduler's own tally, from its status)
- SLOs (``drover metrics``, from the engines' request-ended events, last 60 s):
  ``drover_slo_attainment{request_class,client}``, ``drover_slo_goodput_tokens_per_second{request_class,client}``,
  ``drover_slo_window_requests{request_class,client}``
- leadership: ``drover_control_plane_leader`` (1 in the leading control plane, 0 in a standby); the cluster
  gauges above (instances, queue, scheduler tally, memory groups) exist only in the process that sets them
- gateway: ``drover_gateway_requests_total{endpoint,status,client}``, ``drover_gateway_ttft_seconds{request_class}``,
  ``drover_gateway_inter_token_seconds{request_class}``, ``drover_gateway_tokens_total{kind,client}``,
  ``drover_gateway_request_duration_seconds{endpoint}``
- security: ``drover_replies_refused_total{what}`` (a reply target outside the sender's own inbox: nothing
  published), ``drover_spans_dropped_total{reason}`` (shipped spans past the receiver's size or rate bounds)
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, start_http_server
from pydantic import BaseModel, ConfigDict, Field

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets, seconds. TTFT spans queueing (seconds under load); inter-token is one decode step
# (milliseconds on GPUs, tens of ms on CPU); downtime is Llumnix's stop-and-copy (sub-ms to tens of ms).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
INTER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DOWNTIME_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class MetricsSettings(BaseModel):
    """``[metrics]``: where a process serves its Prometheus endpoint (0: not served; recording still works)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="Bind address of the scrape endpoints.")
    control_port: int = Field(
        0, ge=0, le=65535, description="Control plane's /metrics, /healthz, /readyz port; 0: off."
    )
    engine_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="An engine host's /metrics, /healthz, /readyz port; 0: off. One engine host per machine, "
        "or set it per process (DROVER_METRICS__ENGINE_PORT).",
    )


@dataclass(frozen=True, slots=True)
class SloRow:
    """SLO attainment of one request class and client over a window (control/apps/metrics_exporter.py computes it)."""

    request_class: str
    client: str
    requests: int
    met: int
    goodput_tokens_per_s: float

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 1.0


@dataclass(frozen=True, slots=True)
class InstanceGauges:
    """One instance's load, as the instance gauges show it."""

    instance_id: str
    state: str
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int
    dispatched: int = 0


class Metrics:
    """Every Drover instrument; methods are cheap (a few µs) and thread-safe (the SDK locks)."""

    def __init__(self, service_name: str = "drover") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._reader = PrometheusMetricReader(
            registry=self.registry, scope_info_enabled=False, disable_target_info=True
        )
        self._provider = MeterProvider(
            metric_readers=[self._reader], resource=Resource.create({"service.name": service_name})
        )
        meter = self._provider.get_meter("drover")
        self._lock = threading.Lock()
        self._instances: dict[str, InstanceGauges] = {}
        self._queued = 0
        self._in_flight = 0
        self._scheduler_migrations = {"committed": 0, "aborted": 0}
        self._migrations_in_flight = 0
        self._init_prefix_cache(meter)

        # Request path (scheduler and engines)
        self._requests = meter.create_counter(
            "drover.requests", description="Requests ended, by outcome (finish reason or error code) and class."
        )
        self._tokens = meter.create_counter("drover.tokens", description="Tokens by kind (prompt, completion).")
        self._ttft = meter.create_histogram(
            "drover.ttft",
            unit="s",
            description="Arrival to first token.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self._itl = meter.create_histogram(
            "drover.inter_token",
            unit="s",
            description="Gap between tokens.",
            explicit_bucket_boundaries_advisory=INTER_TOKEN_BUCKETS,
        )
        self._engine_ended = meter.create_counter(
            "drover.engine.requests", description="Requests that left an instance, by finish reason."
        )
        # Security (docs/security.md)
        self._replies_refused = meter.create_counter(
            "drover.replies_refused", description="Replies not published: target outside the sender's own inbox."
        )
        self._spans_dropped = meter.create_counter(
            "drover.spans_dropped", description="Shipped spans dropped at the receiver (size, depth or rate)."
        )
        # Migrations
        self._migrations = meter.create_counter("drover.migrations", description="Migrations by outcome.")
        self._migration_bytes = meter.create_counter(
            "drover.migration.bytes", unit="By", description="KV bytes copied by migrations."
        )
        self._downtime = meter.create_histogram(
            "drover.migration.downtime",
            unit="s",
            description="Stop-and-copy downtime of committed migrations.",
            explicit_bucket_boundaries_advisory=DOWNTIME_BUCKETS,
        )
        # Autoscaler (admission refusals are in drover.requests: outcome = the refusal's error code)
        self._scale_events = meter.create_counter(
            "drover.autoscaler.scale_events",
            description="Instances the autoscaler acted on, by role and direction (out: started, in: drained, "
            "relabel: changed role, counted under the new role).",
        )
        # KunServe parameter-centric memory
        self._memory_events = meter.create_counter(
            "drover.memory.events",
            description="Group steps by kind: drop (leader), join, leave, restore (leader), break; and "
            "drops/restores the memory manager ordered, by outcome.",
        )
        self._memory_freed = meter.create_counter(
            "drover.memory.freed_weight_bytes", unit="By", description="Weight bytes freed by layer drops."
        )
        self._memory_seconds = meter.create_histogram(
            "drover.memory.seconds",
            unit="s",
            description="Duration of one group step (drop, join, restore, leave, break).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._exchange_bytes = meter.create_counter(
            "drover.memory.exchange_bytes", unit="By", description="KV bytes moved by live KV exchanges."
        )
        self._exchange_seconds = meter.create_histogram(
            "drover.memory.exchange_seconds",
            unit="s",
            description="Duration of one live KV exchange (forming or dissolving a group).",
            explicit_bucket_boundaries_advisory=DOWNTIME_BUCKETS,
        )
        self._groups = 0
        self._group_extra_blocks = 0
        self._meter = meter
        self._cluster_gauges = False  # registered by the first set_* call: only the process that owns them
        self._leader_probe: Callable[[], bool] | None = None
        self._slo_rows: list[SloRow] = []
        self._slo_registered = False
        # Gateway
        self._gw_requests = meter.create_counter(
            "drover.gateway.requests", description="Gateway HTTP requests by endpoint and status."
        )
        self._gw_tokens = meter.create_counter("drover.gateway.tokens", description="Tokens by kind and client.")
        self._gw_ttft = meter.create_histogram(
            "drover.gateway.ttft",
            unit="s",
            description="Gateway arrival to first streamed text.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self._gw_itl = meter.create_histogram(
            "drover.gateway.inter_token",
            unit="s",
            description="Gap between tokens seen by the gateway.",
            explicit_bucket_boundaries_advisory=INTER_TOKEN_BUCKETS,
        )
        self._gw_duration = meter.create_histogram(
            "drover.gateway.request_duration",
            unit="s",
            description="Gateway request duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

    def _register_cluster_gauges(self) -> None:
        """The cluster-state gauges, registered on first use: a process that never sets them (a gateway, a
        standby control plane) exports no zero-valued copies of the leader's series under the same names."""
        with self._lock:
            if self._cluster_gauges:
                return
            self._cluster_gauges = True
        meter = self._meter
        meter.create_observable_gauge(
            "drover.memory.groups",
            [lambda _: [Observation(self._groups)]],
            description="KunServe groups formed now.",
        )
        meter.create_observable_gauge(
            "drover.memory.extra_kv_blocks",
            [lambda _: [Observation(self._group_extra_blocks)]],
            description="KV blocks the groups hold beyond their leaders' own pools.",
        )
        # Instances and queue: observed when scraped, from the last values set
        meter.create_observable_gauge(
            "drover.instance.free_blocks", [self._observe("free_blocks")], description="Free KV blocks of an instance."
        )
        meter.create_observable_gauge(
            "drover.instance.total_blocks", [self._observe("total_blocks")], description="KV blocks of an instance."
        )
        meter.create_observable_gauge(
            "drover.instance.running_requests",
            [self._observe("running")],
            description="Requests decoding on an instance.",
        )
        meter.create_observable_gauge(
            "drover.instance.waiting_requests",
            [self._observe("waiting")],
            description="Requests waiting in an instance's queue.",
        )
        meter.create_observable_counter(
            "drover.instance.dispatched",
            [self._observe("dispatched")],
            description="Requests the scheduler dispatched to an instance.",
        )
        meter.create_observable_gauge("drover.instances", [self._observe_states], description="Instances by state.")
        meter.create_observable_gauge(
            "drover.queue_depth",
            [lambda _: [Observation(self._queued)]],
            description="Requests queued at the scheduler (no instance could take them).",
        )
        meter.create_observable_gauge(
            "drover.requests_in_flight",
            [lambda _: [Observation(self._in_flight)]],
            description="Requests the scheduler tracks (queued + running).",
        )
        meter.create_observable_gauge(
            "drover.migrations_in_flight",
            [lambda _: [Observation(self._migrations_in_flight)]],
            description="Live migrations running now.",
        )
        meter.create_observable_counter(
            "drover.scheduler.migrations",
            [lambda _: [Observation(n, {"outcome": o}) for o, n in sorted(self._scheduler_migrations.items())]],
            description="Migrations the scheduler saw end, by outcome (resets when the scheduler restarts).",
        )

    def set_leader_probe(self, probe: Callable[[], bool]) -> None:
        """``drover_control_plane_leader`` (1: this process leads, 0: standby), read from ``probe`` at each scrape."""
        self._leader_probe = probe
        self._meter.create_observable_gauge(
            "drover.control_plane.leader",
            [lambda _: [Observation(1 if self._leader_probe and self._leader_probe() else 0)]],
            description="1 in the control plane that leads (its cluster series are the truth), 0 in a standby.",
        )

    # ------------------------------------------------------------------------------------------- SLOs
    def set_slo(self, rows: Sequence[SloRow]) -> None:
        """SLO attainment and goodput per request class and client over the last window (replaces all rows)."""
        with self._lock:
            self._slo_rows = list(rows)
            register, self._slo_registered = not self._slo_registered, True
        if not register:
            return

        def observe(field: str) -> Callable[[CallbackOptions], list[Observation]]:
            def callback(_: CallbackOptions) -> list[Observation]:
                with self._lock:
                    rows = list(self._slo_rows)
                return [
                    Observation(getattr(r, field), {"request_class": r.request_class, "client": r.client}) for r in rows
                ]

            return callback

        self._meter.create_observable_gauge(
            "drover.slo.attainment",
            [observe("attainment")],
            description="Fraction of requests that ended in the window meeting their class's SLO (interactive: "
            "TTFT and inter-token; batch: deadline).",
        )
        self._meter.create_observable_gauge(
            "drover.slo.goodput_tokens_per_second",
            [observe("goodput_tokens_per_s")],
            description="Output tokens per second of requests that met their SLO, over the window.",
        )
        self._meter.create_observable_gauge(
            "drover.slo.window_requests", [observe("requests")], description="Requests that ended in the window."
        )

    # ------------------------------------------------------------------------------------------- request path
    def request_finished(
        self, outcome: str, request_class: str, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """A request ended: ``outcome`` is its finish reason (stop, length, abort) or an error code."""
        self._requests.add(1, {"outcome": outcome, "request_class": request_class})
        if prompt_tokens:
            self._tokens.add(prompt_tokens, {"kind": "prompt", "request_class": request_class})
        if completion_tokens:
            self._tokens.add(completion_tokens, {"kind": "completion", "request_class": request_class})

    def observe_ttft(self, seconds: float, request_class: str) -> None:
        self._ttft.record(seconds, {"request_class": request_class})

    def observe_inter_token(self, gaps_s: Iterable[float], request_class: str) -> None:
        attributes = {"request_class": request_class}
        for gap in gaps_s:
            self._itl.record(gap, attributes)

    def reply_refused(self, what: str) -> None:
        """A reply (``what``: submit, cancel, status, replay, error) was aimed outside its sender's inbox."""
        self._replies_refused.add(1, {"what": what})

    def spans_dropped(self, count: int, reason: str) -> None:
        if count:
            self._spans_dropped.add(count, {"reason": reason})

    def engine_request_ended(self, instance_id: str, finish_reason: str) -> None:
        self._engine_ended.add(1, {"instance": instance_id, "finish_reason": finish_reason})

    def scale_event(self, role: str, direction: str, count: int = 1) -> None:
        """The autoscaler started (``out``), drained (``in``) or relabelled (``relabel``) instances of ``role``."""
        if count:
            self._scale_events.add(count, {"role": role, "direction": direction})

    def migration_finished(self, outcome: str, copied_bytes: int = 0, downtime_s: float = 0.0) -> None:
        """A migration ended: ``outcome`` is committed, aborted or refused."""
        self._migrations.add(1, {"outcome": outcome})
        if copied_bytes:
            self._migration_bytes.add(copied_bytes)
        if outcome == "committed":
            self._downtime.record(downtime_s)

    # ------------------------------------------------------------------------------------------- memory
    def memory_event(self, kind: str, freed_weight_bytes: int = 0, seconds: float = 0.0, outcome: str = "ok") -> None:
        """A group step (engine side) or an ordered drop/restore (memory manager) ended."""
        self._memory_events.add(1, {"kind": kind, "outcome": outcome})
        if freed_weight_bytes > 0:
            self._memory_freed.add(freed_weight_bytes)
        if seconds > 0:
            self._memory_seconds.record(seconds, {"kind": kind})

    def memory_exchange(self, moved_bytes: int, seconds: float) -> None:
        if moved_bytes:
            self._exchange_bytes.add(moved_bytes)
        self._exchange_seconds.record(seconds)

    def set_memory_groups(self, groups: int, extra_kv_blocks: int) -> None:
        self._register_cluster_gauges()
        self._groups, self._group_extra_blocks = groups, extra_kv_blocks

    # ------------------------------------------------------------------------------------------- instances
    def update_instance(self, gauges: InstanceGauges) -> None:
        self._register_cluster_gauges()
        with self._lock:
            self._instances[gauges.instance_id] = gauges

    def remove_instance(self, instance_id: str) -> None:
        with self._lock:
            self._instances.pop(instance_id, None)
            self._prefix_cache.pop(instance_id, None)

    def set_instances(self, instances: Sequence[InstanceGauges]) -> None:
        """Replace every instance's gauges (instances not listed disappear from the output)."""
        self._register_cluster_gauges()
        with self._lock:
            self._instances = {g.instance_id: g for g in instances}

    def set_scheduler(self, queued: int, in_flight: int) -> None:
        self._register_cluster_gauges()
        self._queued, self._in_flight = queued, in_flight

    def set_migrations(self, completed: int, aborted: int, in_flight: int) -> None:
        """The scheduler's migration tally (cumulative since it started) and migrations running now."""
        self._register_cluster_gauges()
        self._scheduler_migrations = {"committed": completed, "aborted": aborted}
        self._migrations_in_flight = in_flight

    def _observe(self, field: str) -> Callable[[CallbackOptions], list[Observation]]:
        def callback(_: CallbackOptions) -> list[Observation]:
            with self._lock:
                rows = list(self._instances.values())
            return [Observation(getattr(g, field), {"instance": g.instance_id}) for g in rows]

        return callback

    def _observe_states(self, _: CallbackOptions) -> list[Observation]:
        with self._lock:
            states = Counter(g.state for g in self._instances.values())
        return [Observation(count, {"state": state}) for state, count in sorted(states.items())]

    # ------------------------------------------------------------------------------------------- gateway
    def gateway_request(self, endpoint: str, status: int, client: str, duration_s: float | None = None) -> None:
        self._gw_requests.add(1, {"endpoint": endpoint, "status": str(status), "client": client})
        if duration_s is not None:
            self._gw_duration.record(duration_s, {"endpoint": endpoint})

    def gateway_tokens(self, client: str, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens:
            self._gw_tokens.add(prompt_tokens, {"kind": "prompt", "client": client})
        if completion_tokens:
            self._gw_tokens.add(completion_tokens, {"kind": "completion", "client": client})

    def gateway_ttft(self, seconds: float, request_class: str) -> None:
        self._gw_ttft.record(seconds, {"request_class": request_class})

    def gateway_inter_token(self, gaps_s: Iterable[float], request_class: str) -> None:
        attributes = {"request_class": request_class}
        for gap in gaps_s:
            self._gw_itl.record(gap, attributes)

    # ------------------------------------------------------------------------------------------- export
    def render(self) -> bytes:
        """The Prometheus text exposition of every series with data."""
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self._provider.shutdown()

    # -- Prefix cache (KV-aware routing): what engines report in heartbeats, cumulative per instance ---------
    def _init_prefix_cache(self, meter: Any) -> None:
        self._prefix_cache: dict[str, tuple[int, int, int]] = {}  # instance -> (cached blocks, queried, hit)
        meter.create_observable_gauge(
            "drover.instance.cached_blocks",
            [self._observe_prefix_cache],
            description="Prefix-cache blocks an instance holds (from its KV events).",
        )
        meter.create_observable_gauge(
            "drover.prefix_cache.hit_rate",
            [lambda _: [Observation(self.prefix_cache_totals()[2])]],
            description="Cluster prefix-cache hit rate: prompt tokens found cached / prompt tokens looked up.",
        )
        meter.create_observable_counter(
            "drover.prefix_cache.saved_tokens",
            [lambda _: [Observation(self.prefix_cache_totals()[1])]],
            description="Prefill tokens saved by prefix-cache hits, cluster total.",
        )

    def set_prefix_cache(self, instance_id: str, cached_blocks: int, query_tokens: int, hit_tokens: int) -> None:
        with self._lock:
            self._prefix_cache[instance_id] = (cached_blocks, query_tokens, hit_tokens)

    def prefix_cache_totals(self) -> tuple[int, int, float]:
        """(prompt tokens looked up, tokens found cached, hit rate) over the instances that report."""
        with self._lock:
            rows = list(self._prefix_cache.values())
        queried = sum(r[1] for r in rows)
        hit = sum(r[2] for r in rows)
        return queried, hit, (hit / queried if queried else 0.0)

    def _observe_prefix_cache(self, _: CallbackOptions) -> list[Observation]:
        with self._lock:
            rows = list(self._prefix_cache.items())
        return [Observation(cached, {"instance": iid}) for iid, (cached, _q, _h) in rows]


_process_metrics: Metrics | None = None
_process_lock = threading.Lock()


def metrics() -> Metrics:
    """This process's metrics (created on first use; recording costs microseconds whether served or not)."""
    global _process_metrics
    with _process_lock:
        if _process_metrics is None:
            _process_metrics = Metrics()
        return _process_metrics


@dataclass
class MetricsServer:
    """A running Prometheus scrape endpoint (``GET /metrics`` on its own daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2)


def start_metrics_server(port: int, host: str = "127.0.0.1", source: Metrics | None = None) -> MetricsServer:
    """Serve ``source`` (default: this process's metrics) for Prometheus; port 0 picks a free port."""
    registry = (source or metrics()).registry
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
