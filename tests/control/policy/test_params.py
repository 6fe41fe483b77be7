"""PolicyParams: paper defaults, run-time updates from CLI strings, validation."""

from __future__ import annotations

import pytest

from control.policy.params import DispatchParams, PolicyParams


def test_defaults_are_llumnix_values() -> None:
    p = PolicyParams()
    assert (p.migrate_threshold, p.migration_period_s, p.max_migrations_per_instance) == (3.0, 0.05, 1)
    assert (p.last_stage_max_blocks, p.max_stages, p.migration_pick) == (1, 8, "shortest")
    assert p.dispatch_params() == DispatchParams()


def test_with_updates_coerces_strings_and_validates() -> None:
    p = PolicyParams().with_updates(migrate_threshold="5", migration_enabled="false", dispatch_policy="least_loaded")
    assert p.migrate_threshold == 5.0 and p.migration_enabled is False and p.dispatch_policy == "least_loaded"
    assert p.as_dict()["migrate_threshold"] == 5.0
    with pytest.raises(ValueError, match="unknown policy parameter"):
        PolicyParams().with_updates(nope=1)
    with pytest.raises(ValueError, match="dispatch_policy"):
        PolicyParams().with_updates(dispatch_policy="fastest")
    with pytest.raises(ValueError, match="expects int"):
        PolicyParams().with_updates(max_stages="three")
    with pytest.raises(ValueError, match=">= 1"):
        PolicyParams().with_updates(max_migrations_per_instance=0)
