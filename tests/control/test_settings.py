from __future__ import annotations

from pathlib import Path

import pytest

from control.settings import Settings, SettingsError, dump_toml, load_settings


def test_defaults_come_from_the_model() -> None:
    s = load_settings()
    assert s.engine.block_size % 32 == 0
    assert s.nats.url is None
    assert s.policy.dispatch_policy == "freeness"
    assert s.policy.last_stage_max_blocks == 1  # Drover live default (Llumnix: 16)


def test_precedence_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "d.toml"
    config.write_text('[engine]\nblock_size = 64\nmax_num_seqs = 3\n[nats]\nurl = "nats://file:1"\n')
    monkeypatch.setenv("DROVER_ENGINE__MAX_NUM_SEQS", "5")
    s = load_settings(config, {"nats": {"url": "nats://flag:2"}})
    assert s.engine.block_size == 64  # file
    assert s.engine.max_num_seqs == 5  # env beats file
    assert s.nats.url == "nats://flag:2"  # flag beats both


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    config = tmp_path / "d.toml"
    config.write_text("[engine]\nblok_size = 64\n")
    with pytest.raises(SettingsError, match=r"unknown setting engine\.blok_size \(in .*d\.toml\)"):
        load_settings(config)


def test_dump_round_trips(tmp_path: Path) -> None:
    s = load_settings(overrides={"engine": {"kind": "sim", "sim_num_blocks": 77}})
    path = tmp_path / "out.toml"
    path.write_text(dump_toml(s))
    assert load_settings(path) == s
    assert isinstance(s, Settings)
