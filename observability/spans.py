"""Span names and attribute keys, one place, following OpenTelemetry semantic conventions where they fit
(``messaging.*`` for NATS hops, ``gen_ai.*`` for model requests) and ``drover.*`` for the rest."""

from __future__ import annotations

# Span names: the request lifecycle
GATEWAY_REQUEST = "drover.gateway.request"  # OpenAI gateway: HTTP arrival -> response end (parent of submit)
CLIENT_SUBMIT = "drover.submit"  # client: submit -> done
SCHEDULER_RECEIVE = "drover.scheduler.receive"
SCHEDULER_QUEUE = "drover.queue"  # arrival -> dispatched
SCHEDULER_DISPATCH = "drover.dispatch"
ENGINE_PREFILL = "drover.prefill"  # engine: added -> first token
ENGINE_DECODE = "drover.decode"  # engine: first token -> finished
ENGINE_REQUEST = "drover.engine.request"
MIGRATION = "drover.migration"
MIGRATION_STAGE = "drover.migration.stage"
MIGRATION_STOP_AND_COPY = "drover.migration.stop_and_copy"
MIGRATION_RESUME = "drover.migration.resume"
MEMORY_DROP = "drover.memory.drop"  # memory manager: a KunServe group forms (members drop layers)
MEMORY_RESTORE = "drover.memory.restore"  # memory manager: a group restores its layers and ends
MEMORY_GROUP = "drover.memory.group"  # engine: one group step (suffix .join/.lead/.dissolve/.leave/.break)
MEMORY_EXCHANGE = "drover.memory.exchange"  # engine: running requests' KV moved to the layers' new owner
AUTOSCALE_DECISION = "drover.autoscale.decision"  # autoscaler: one planning tick that starts, drains or relabels
MEMORY_BREAK = "drover.memory.break"  # engine: a group that lost a member ends; its requests resume elsewhere

# Attributes
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
REQUEST_ID = "drover.request.id"
CLIENT_ID = "drover.client.id"
INSTANCE_ID = "drover.instance.id"
DISPATCH_POLICY = "drover.dispatch.policy"
PRIORITY = "drover.request.priority"
REQUEST_CLASS = "drover.request.class"
MIGRATION_ID = "drover.migration.id"
GROUP_ID = "drover.memory.group_id"
MIGRATION_BLOCKS = "drover.migration.blocks"
MIGRATION_BYTES = "drover.migration.bytes"
MIGRATION_STAGE_INDEX = "drover.migration.stage"
AUTOSCALE_REASON = "drover.autoscale.reason"
AUTOSCALE_BEFORE = "drover.autoscale.before"  # .<role>: live (active + starting) instances before the decision
AUTOSCALE_AFTER = "drover.autoscale.after"  # .<role>: the plan's target
AUTOSCALE_START = "drover.autoscale.start"  # .<role>: instances started now
AUTOSCALE_DRAIN = "drover.autoscale.drain"  # instances drained now (count)
AUTOSCALE_RELABEL = "drover.autoscale.relabel"  # instances relabelled now (count)
AUTOSCALE_INPUT = "drover.autoscale.input"  # .<name>: the plan's inputs (rates, queue, demand estimates)
