"""``stalwart run`` flags: torchrun's parser plus ours, bad input rejected with a message that says why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stalwart.errors import ConfigError
from stalwart.launcher.args import build_config, parse


def _config(tmp_path: Path, *argv: str):  # type: ignore[no-untyped-def]
    args = parse(["--log-dir", str(tmp_path), *argv, "train.py", "--lr", "1"])
    return build_config(args, {}, {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--status-port", "70000"], "--status-port 70000"),
        (["--fault", "explode:rank=0"], "unknown kind 'explode'"),
        (["--fault", "crash:rank=x"], "bad value for 'rank'"),
        (["--nnodes", "3:1"], "--nnodes '3:1'"),
        (["--nnodes", "a:b:c"], "--nnodes 'a:b:c'"),
        (["--module", "--no-python"], "either --module or --no-python"),
        (["--pre-train-script", "'unclosed"], "--pre-train-script"),
        (["--post-train-script", "  "], "--post-train-script is empty"),
        (["--signals-to-handle", "SIGFOO"], "unknown signal 'SIGFOO'"),
        (["--signals-to-handle", "SIGTERM,SIGKILL"], "SIGKILL cannot be caught"),
        (["--signals-to-handle", "CHLD"], "SIGCHLD comes at every worker's exit"),
        (["--signals-to-handle", "SIGTERM,SIGSEGV"], "SIGSEGV reports a crash of the agent itself"),
        (["--user-error-threshold", "0"], "--user-error-threshold"),
        (["--restart-ladder", "exit,restart_workers"], "must be in ladder order"),
        (["--restart-ladder", "in_process,exit"], "in_process rung is not available"),
        (["--rdzv-poll-interval", "0"], "--rdzv-poll-interval 0.0"),
        (["--max-restarts", "-1"], "--max-restarts -1"),
        (["--monitor-interval", "0"], "--monitor-interval 0"),
        (["--standby-preload", "numpy,not a module"], "'not a module' is not a module name"),
        (["--node-name", "a/b"], "--node-name 'a/b'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse([*argv, "train.py"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_torchrun_flags_stalwart_ignores_are_named_not_dropped_unseen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _config(tmp_path, "--numa-binding", "node", "--virtual-local-rank", "--start-method", "fork")
    err = capsys.readouterr().err
    for flag in ("--numa-binding", "--virtual-local-rank", "--start-method"):
        assert f"stalwart run: {flag} is a torchrun flag stalwart does not support yet; it is ignored" in err
    _config(tmp_path, "--start-method", "spawn")  # torchrun's default: nothing to say
    assert "does not support" not in capsys.readouterr().err


def test_a_missing_script_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--nproc-per-node", "2"])
    assert exc.value.code == 2
    assert "training_script" in capsys.readouterr().err


def test_bad_values_found_while_resolving_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--nproc-per-node 'lots'"):
        _config(tmp_path, "--nproc-per-node", "lots")
    with pytest.raises(ConfigError, match="--local-ranks-filter '0,x'"):
        _config(tmp_path, "--local-ranks-filter", "0,x")


def test_standalone_defaults_keep_everything_on_loopback(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "--standalone", "--nproc-per-node", "2")
    assert (cfg.rdzv_backend, cfg.rdzv_endpoint, cfg.worker_host) == ("c10d", "127.0.0.1:0", "127.0.0.1")
    assert (cfg.status_host, cfg.status_port) == ("127.0.0.1", 0)
    assert cfg.standby == 2 and cfg.max_restarts == 0
    assert cfg.entrypoint == "train.py" and cfg.args == ("--lr", "1")
    assert cfg.worker_env["OMP_NUM_THREADS"] == "1"


def test_a_single_node_without_endpoint_uses_a_local_c10d_store_like_torchrun(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "--nproc-per-node", "1")
    assert (cfg.rdzv_backend, cfg.rdzv_endpoint) == ("c10d", "127.0.0.1:0")


def test_stalwart_flags_resolve_into_the_config(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        "--nnodes", "1:2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29400",
        "--rdzv-id", "job", "--rdzv-conf", "join_timeout=5",
        "--fault", "crash:rank=1:step=3", "--no-standby", "--standby-preload", "json,csv",
        "--status-port", "0", "--pre-train-script", "prep --dir 'a b'",
        "--post-train-script", "done.sh", "--user-error-threshold", "9", "--node-name", "n1",
        "--local-ranks-filter", "0", "--redirects", "3", "--tee", "1", "--shutdown-timeout", "7",
        "--max-restarts", "4",
    )  # fmt: skip
    assert (cfg.min_nodes, cfg.max_nodes, cfg.run_id) == (1, 2, "job")
    assert cfg.rdzv_configs == {"join_timeout": "5"}
    assert cfg.worker_env["STALWART_FAULT"] == "crash:rank=1:step=3"
    assert cfg.standby == 0 and tuple(cfg.standby_preload) == ("json", "csv")
    assert cfg.status_port is None
    assert cfg.pre_train == ["prep", "--dir", "a b"] and cfg.post_train == ["done.sh"]
    assert cfg.startup_window == 9 and cfg.node == "n1" and cfg.local_ranks_filter == frozenset({0})
    assert cfg.shutdown_timeout == 7 and cfg.max_restarts == 4
    assert cfg.log_dir == os.path.abspath(tmp_path)


def test_the_status_endpoint_binds_elsewhere_only_when_asked(tmp_path: Path) -> None:
    assert _config(tmp_path, "--standalone").status_host == "127.0.0.1"
    assert _config(tmp_path, "--standalone", "--status-host", "0.0.0.0").status_host == "0.0.0.0"
