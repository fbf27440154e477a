"""bench.profile_share: shares of functions in a worker's py-spy samples, per process."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from bench.contenders import ContenderError, profiled
from bench.profile_share import main, shares

TOP = 'process 10:"python -m bench.contenders.touchstream --processes 2";'
ONE = 'process 11:"python -m bench.contenders.touchstream --process-id 0";'
RAW = [
    # process 11, a cluster member: its worker thread is rooted in Bytewax, not Python
    f"{TOP}{ONE}thread (21);_KafkaPartition.next_batch (connectors/kafka.py:233) 30\n",
    f"{TOP}{ONE}thread (21);_ShardLogic.on_batch (flows/experience.py:147);"
    "decode_record (flows/model.py:672) 60\n",
    f"{TOP}{ONE}thread (21) 10\n",
    # its main thread waits in cluster_main (py-spy shows run_dataflow), its poller waits
    f"{TOP}{ONE}thread (11): MainThread;_run_module_as_main (<frozen runpy>:198);"
    "run_dataflow (flows/runner.py:153) 400\n",
    f"{TOP}{ONE}thread (22): rules-redis;Thread.run (threading.py:975);"
    "_Poller._run (connectors/rules_sources.py:88);Event.wait (threading.py:622) 500\n",
    # the contender's own process starts the cluster and waits
    f"{TOP}thread (10): MainThread;_run_module_as_main (<frozen runpy>:198);"
    "Popen.wait (subprocess.py:1264) 300\n",
    "\n",
]

SOLO = [
    # a 1-process run: the worker is the main thread, which also loads profiles first
    'process 5:"x";thread (5): MainThread;_run_module_as_main (<frozen runpy>:198);'
    "main (bench/contenders/touchstream.py:120);load_profiles (t.py:53) 70\n",
    'process 5:"x";thread (5): MainThread;_run_module_as_main (<frozen runpy>:198);'
    "run_dataflow (flows/runner.py:153);_KafkaPartition.next_batch (k.py:1) 15\n",
    'process 5:"x";thread (5): MainThread;_run_module_as_main (<frozen runpy>:198);'
    "run_dataflow (flows/runner.py:153);_ShardLogic.on_batch (e.py:1) 85\n",
]


def test_shares_count_only_the_workers_samples_of_the_innermost_process() -> None:
    got = shares(RAW, ["_KafkaPartition.next_batch", "decode_record", "run_dataflow"])
    assert got == {"11": {"samples": 100.0, "_KafkaPartition.next_batch": 0.3,
                          "decode_record": 0.6, "run_dataflow": 0.0}}


def test_a_one_process_worker_leaves_out_its_set_up() -> None:
    got = shares(SOLO, ["_KafkaPartition.next_batch", "load_profiles"])
    assert got == {"5": {"samples": 100.0, "_KafkaPartition.next_batch": 0.15,
                         "load_profiles": 0.0}}


def test_another_worker_function_picks_other_threads() -> None:
    got = shares(RAW, ["Event.wait"], worker="_Poller._run")
    assert got == {"11": {"samples": 500.0, "Event.wait": 1.0}}


def test_the_command_prints_per_process_and_fails_without_a_worker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "one.txt"
    raw.write_text("".join(SOLO))
    assert main([str(raw), "_KafkaPartition.next_batch"]) == 0
    out = capsys.readouterr().out
    assert "process 5: 100 worker samples" in out
    assert "15.0 %  _KafkaPartition.next_batch" in out
    assert main([str(raw), "f", "--worker", "nothing"]) == 1
    packed = tmp_path / "one.txt.xz"
    packed.write_bytes(lzma.compress(raw.read_bytes()))
    capsys.readouterr()
    assert main([str(packed), "_KafkaPartition.next_batch"]) == 0
    assert "15.0 %  _KafkaPartition.next_batch" in capsys.readouterr().out


def test_profiled_runs_the_command_under_py_spy(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    with pytest.raises(ContenderError, match="pip install py-spy"):
        profiled(["python", "-m", "x"], tmp_path / "p.txt")
    (tmp_path / "py-spy").touch()
    cmd = profiled(["python", "-m", "x"], tmp_path / "p.txt")
    assert cmd[0] == str(tmp_path / "py-spy")
    assert cmd[1:3] == ["record", "--subprocesses"]
    assert {"--idle", "--threads", "--nonblocking"} <= set(cmd)
    assert cmd[cmd.index("--output") + 1] == str(tmp_path / "p.txt")
    assert cmd[-4:] == ["--", "python", "-m", "x"]
