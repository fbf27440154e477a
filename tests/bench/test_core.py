"""bench.core: result files are never replaced by a later run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.core import BenchContext, free_path
from bench.services import redis_db_url


def _ctx(results: Path) -> BenchContext:
    return BenchContext(brokers="", redis_url="", quick=True, runs=1, results_dir=results,
                        work_dir=results / "work", date="2026-11-24")


def test_a_part_keeps_one_stem_per_run_and_a_later_run_takes_the_next(tmp_path: Path) -> None:
    first = _ctx(tmp_path)
    assert first.results_path("throughput", ".png") == tmp_path / "2026-11-24-throughput.png"
    first.results_path("throughput").write_text("{}")  # the part's JSON, written last
    # the same run goes on naming its files with its stem
    assert first.results_path("throughput", "-x.txt") == tmp_path / "2026-11-24-throughput-x.txt"
    # a later run of that day (python -m bench throughput after make bench) does not
    # replace them: every one of its files carries -2
    second = _ctx(tmp_path)
    assert second.results_path("throughput", ".png") == tmp_path / "2026-11-24-throughput-2.png"
    second.results_path("throughput").write_text("{}")
    assert second.results_path("throughput") == tmp_path / "2026-11-24-throughput-2.json"
    assert _ctx(tmp_path).results_path("throughput") == tmp_path / "2026-11-24-throughput-3.json"
    # other parts are not affected
    assert second.results_path("memory") == tmp_path / "2026-11-24-memory.json"


def test_free_path(tmp_path: Path) -> None:
    table = tmp_path / "2026-11-24-table.md"
    assert free_path(table) == table
    table.write_text("")
    assert free_path(table) == tmp_path / "2026-11-24-table-2.md"
    (tmp_path / "2026-11-24-table-2.md").write_text("")
    assert free_path(table) == tmp_path / "2026-11-24-table-3.md"


def test_redis_db_url_names_the_part_s_own_database() -> None:
    # Each part keeps its keys in a database of its own on the bench's redis-server
    # (the latency part 11, engine_idle 12, gateway_idle 9).
    assert redis_db_url("redis://127.0.0.1:6390/0", 11) == "redis://127.0.0.1:6390/11"
    assert redis_db_url("redis://127.0.0.1:6390", 9) == "redis://127.0.0.1:6390/9"
    assert redis_db_url("rediss://u:p@h:1/3?ssl_cert_reqs=none", 12) == \
        "rediss://u:p@h:1/12?ssl_cert_reqs=none"


def test_run_count_is_one_in_quick_mode_and_at_least_one_otherwise(tmp_path: Path) -> None:
    quick = _ctx(tmp_path)
    assert replace(quick, runs=5).run_count == 1
    full = replace(quick, quick=False)
    assert [replace(full, runs=n).run_count for n in (0, 1, 3)] == [1, 1, 3]


def test_a_latency_settings_set_reaches_the_engine_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # what bench.latency's EngineProcess puts in the engine's environment, as the
    # engine's settings read it: linger.ms to the producers only, the rest to consumers
    from bench.latency import KAFKA_SETTINGS, kafka_config_env
    from flows.settings import load_settings

    for name, value in kafka_config_env(KAFKA_SETTINGS["100/100/5"]).items():
        monkeypatch.setenv(name, value)
    k = load_settings().kafka
    assert k.consumer_config == {"fetch.wait.max.ms": 100, "fetch.queue.backoff.ms": 100}
    assert k.producer_config == {"linger.ms": 5}
    assert k.config == {}
    assert kafka_config_env({}) == {}
