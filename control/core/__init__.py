"""The control core: the decisions of the control plane with no I/O and no clock of its own.

It takes events (a submission, a heartbeat snapshot, an engine event, a migration stage finished, a timer tick
carrying ``now``) and returns commands (dispatch, start/advance/stop/abort a migration, evict, scale, form or
dissolve a group, reply). Two shells drive it: the actors (``actors/``: NATS subjects in, bus messages out,
JetStream KV persistence and timers) and the simulator (``control/simulator/``: a virtual clock in,
``SimEngineCore`` calls out). Decisions themselves are the pure functions of ``control/policy/``.
"""
