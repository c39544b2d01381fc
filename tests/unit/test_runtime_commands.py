"""`appliance keys` for scripts (`--json`), the serve options on the command line, and what
`serve` warns about before it listens beyond this machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from appliance import cli
from appliance.runtime import commands, keys, service
from appliance.workspace import Workspace


def test_keys_create_json_prints_the_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "ws"
    assert cli.main(["--home", str(home), "keys", "create", "ci-bot", "--json"]) == 0
    out, err = capsys.readouterr()
    made = json.loads(out)
    assert set(made) == {"id", "name", "key", "created"} and made["name"] == "ci-bot"
    assert made["key"].startswith(f"apk_{made['id']}_")
    assert keys.KeyChecker(Workspace(home)).name_of(made["key"]) == "ci-bot"
    assert made["key"] not in err  # shown once, in the JSON only

    assert cli.main(["--home", str(home), "keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{"id": made["id"], "name": "ci-bot", "created": made["created"], "revoked": None,
                       "state": "active"}]
    assert cli.main(["--home", str(home), "keys", "revoke", "ci-bot"]) == 0
    capsys.readouterr()
    assert cli.main(["--home", str(home), "keys", "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["state"] == "revoked" and row["revoked"]


def test_keys_list_json_of_an_empty_workspace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--home", str(tmp_path / "none"), "keys", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_keys_errors_carry_their_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = str(tmp_path / "ws")
    assert cli.main(["--home", home, "keys", "revoke", "nobody"]) == 4  # not found
    assert cli.main(["--home", home, "keys", "create", "bad name"]) == 5  # invalid input


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home")
    commands.register(parser.add_subparsers())
    return parser.parse_args(list(argv))


def test_serve_flags_reach_the_options() -> None:
    args = parse("serve", "m", "--header-timeout", "5", "--idle-timeout", "20", "--body-timeout", "9",
                 "--max-connections", "300", "--max-connections-per-client", "0",
                 "--protect-metrics", "--log-level", "warning")
    options = commands._options(args)
    assert (options.header_timeout, options.idle_timeout, options.body_timeout) == (5, 20, 9)
    assert (options.max_connections, options.max_connections_per_client) == (300, 0)
    assert options.protect_metrics and options.log_level == "warning"
    assert service.ServeOptions.from_params(options.params()) == options
    config = service.server_config(options)
    assert (config.max_connections, config.protect_metrics, config.header_timeout) == (300, True, 5)
    default = commands._options(parse("serve", "m"))
    assert default.max_connections > default.max_connections_per_client > 0
    assert not default.protect_metrics and default.log_level == "info"


@pytest.mark.parametrize("flag, value", [("--header-timeout", "0"), ("--idle-timeout", "-1"),
                                         ("--max-connections", "0"), ("--max-connections-per-client", "-1")])
def test_bad_serve_limits_are_refused(flag: str, value: str) -> None:
    from appliance.errors import ValidationError

    with pytest.raises(ValidationError, match=flag.lstrip("-").replace("-", " ")):
        commands._options(parse("serve", "m", flag, value))


def test_a_server_beyond_loopback_warns_that_health_and_metrics_are_open(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(tmp_path / "ws").ensure()
    keys.create(ws, "k")
    args = parse("serve", "m", "--host", "0.0.0.0")
    commands._warnings(ws, commands._options(args), args)
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "/health and /metrics answer without a key" in err
    assert "--protect-metrics" in err
    args = parse("serve", "m", "--host", "0.0.0.0", "--protect-metrics")
    commands._warnings(ws, commands._options(args), args)
    err = capsys.readouterr().err
    assert "0.0.0.0" in err and "without a key" not in err
    args = parse("serve", "m")
    commands._warnings(ws, commands._options(args), args)
    assert "without a key" not in capsys.readouterr().err  # loopback: this machine only
