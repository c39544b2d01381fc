"""`appliance systemd install`: the units are rendered with this installation's paths, listen on
loopback unless told otherwise, bind back only what lives under a home directory, and refuse what
would make them unsafe or broken. (`systemd-analyze verify` on them: tests/integration.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from appliance import cli, systemd
from appliance.errors import ExitCode, RefusedError, ValidationError
from appliance.runtime.limits import DEFAULT_MAX_CONNECTIONS, FD_RESERVE
from appliance.systemd import JOB_UNIT, SERVER_UNIT, UnitConfig

WS = Path("/srv/appliance-ws")  # rendering never touches the workspace; install must not be in /tmp


def config(**overrides: object) -> UnitConfig:
    base: dict = {"workspace": WS, "python": Path("/opt/appliance/.venv/bin/python"),
                  "artifacts": ("demo-gguf-q4_k_m", "demo-onnx-int4"), "gpu": "none",
                  "code_paths": (Path("/opt/appliance/.venv"), Path("/usr"))}
    return UnitConfig(**{**base, **overrides})


def lines(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_both_units_are_rendered_with_real_paths_and_no_placeholder_left() -> None:
    units = systemd.render(config())
    assert set(units) == {SERVER_UNIT, JOB_UNIT}
    for text in units.values():
        assert not re.search(r"@[A-Z_]+@", text)
        assert lines(text, "User") == ["appliance"] and lines(text, "Group") == ["appliance"]
        assert lines(text, "ReadWritePaths") == [str(WS)]  # the only writable path
        assert lines(text, "ProtectSystem") == ["strict"] and lines(text, "ProtectHome") == ["yes"]
        assert "HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1" in text
        assert lines(text, "NoNewPrivileges") == ["yes"] and lines(text, "PrivateTmp") == ["yes"]
    server, job = units[SERVER_UNIT], units[JOB_UNIT]
    assert lines(server, "ExecStart") == [
        f"/opt/appliance/.venv/bin/python -I -m appliance --home {WS} serve demo-gguf-q4_k_m "
        f"demo-onnx-int4 --host 127.0.0.1 --port 8321 --max-connections {DEFAULT_MAX_CONNECTIONS}"]
    assert lines(job, "ExecStart") == [f"/opt/appliance/.venv/bin/python -I -m appliance --home {WS} "
                                       "jobs run %i"]
    assert lines(server, "Restart") == ["on-failure"] and not lines(job, "Restart")


def test_the_server_is_loopback_only_and_the_job_has_no_network() -> None:
    units = systemd.render(config())
    server, job = units[SERVER_UNIT], units[JOB_UNIT]
    assert lines(server, "IPAddressDeny") == ["any"] and lines(server, "IPAddressAllow") == ["localhost"]
    assert lines(server, "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6"]
    assert lines(server, "MemoryDenyWriteExecute") == ["yes"]
    assert lines(job, "PrivateNetwork") == ["yes"]
    assert lines(job, "IPAddressAllow") == ["localhost"]
    assert not lines(job, "MemoryDenyWriteExecute")  # torch's oneDNN writes then runs code


def test_a_non_loopback_host_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValidationError) as err:
        systemd.render(config(host="0.0.0.0"))
    assert "not a loopback address" in err.value.message and "--allow-remote" in err.value.hint


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert f"--host {host} " in systemd.render(config(host=host))[SERVER_UNIT]


def test_allow_remote_opens_the_ip_allow_list_to_match() -> None:
    server = systemd.render(config(host="0.0.0.0", allow_remote=True))[SERVER_UNIT]
    assert lines(server, "IPAddressAllow") == ["any"] and "--host 0.0.0.0 " in server
    server = systemd.render(config(host="10.0.0.5", allow_remote=True,
                                   allow_from=("10.0.0.0/8", "192.168.1.7")))[SERVER_UNIT]
    assert lines(server, "IPAddressAllow") == ["localhost 10.0.0.0/8 192.168.1.7"]
    job = systemd.render(config(host="0.0.0.0", allow_remote=True))[JOB_UNIT]
    assert lines(job, "IPAddressAllow") == ["localhost"]  # jobs never open


def test_code_under_a_home_directory_is_bound_back_read_only() -> None:
    code = (Path("/root/.pyenv/versions/3.11.7"), Path("/root/.pyenv/versions/3.11.7/lib/python3.11"),
            Path("/home/op/appliance"), Path("/usr/lib/python3"))
    text = systemd.render(config(code_paths=code))[JOB_UNIT]
    assert lines(text, "ProtectHome") == ["tmpfs"]
    assert lines(text, "BindReadOnlyPaths") == ["/home/op/appliance", "/root/.pyenv/versions/3.11.7"]
    assert not lines(text, "BindPaths")


def test_a_workspace_under_a_home_directory_is_bound_back_writable() -> None:
    ws = Path("/home/op/.local/share/appliance")
    text = systemd.render(config(workspace=ws, code_paths=(Path("/home/op/.local/share/appliance/x"),
                                                           Path("/opt/venv"))))[SERVER_UNIT]
    assert lines(text, "ProtectHome") == ["tmpfs"]
    assert lines(text, "BindPaths") == [str(ws)] and lines(text, "ReadWritePaths") == [str(ws)]
    assert not lines(text, "BindReadOnlyPaths")  # inside the workspace: already there


def test_gpu_opens_only_the_nvidia_devices_and_only_where_asked() -> None:
    units = systemd.render(config(gpu="jobs"))
    job, server = units[JOB_UNIT], units[SERVER_UNIT]
    assert lines(job, "PrivateDevices") == ["no"] and lines(job, "DevicePolicy") == ["closed"]
    assert lines(job, "DeviceAllow") == ["char-nvidia* rw"]
    assert lines(server, "PrivateDevices") == ["yes"] and not lines(server, "DeviceAllow")
    server = systemd.render(config(gpu="all"))[SERVER_UNIT]
    assert lines(server, "DeviceAllow") == ["char-nvidia* rw"]
    for text in systemd.render(config(gpu="none")).values():
        assert lines(text, "PrivateDevices") == ["yes"]


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"workspace": Path("/srv/my appliance")}, "cannot be written into a unit file"),
    ({"workspace": Path("/srv/100%")}, "cannot be written into a unit file"),
    ({"python": Path("relative/python")}, "cannot be written into a unit file"),
    ({"user": "Bad User"}, "not a valid user"),
    ({"artifacts": ()}, "at least one artifact"),
    ({"artifacts": ("ok", "x; rm -rf /")}, "invalid artifact name"),
    ({"port": 80}, "needs a privilege"),
    ({"host": "example.org", "allow_remote": True}, "not an IP address"),
    ({"allow_remote": True, "allow_from": ("10.0.0.0/33",)}, "not an IP address"),
])
def test_unsafe_or_broken_settings_are_refused(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        systemd.render(config(**overrides))
    assert fragment in err.value.message and err.value.hint


def test_the_file_descriptor_limit_matches_the_connection_cap() -> None:
    """The server keeps at most --max-connections sockets; the unit's LimitNOFILE leaves room for
    them plus what the process itself holds, so the cap is reached before the limit (past the
    limit, accept() fails and every client waits)."""
    server = systemd.render(config())[SERVER_UNIT]
    assert lines(server, "LimitNOFILE") == [str(DEFAULT_MAX_CONNECTIONS + FD_RESERVE)]
    server = systemd.render(config(max_connections=300))[SERVER_UNIT]
    assert lines(server, "LimitNOFILE") == [str(300 + FD_RESERVE)]
    assert lines(server, "ExecStart")[0].endswith(" --max-connections 300")
    with pytest.raises(ValidationError, match="max-connections"):
        systemd.render(config(max_connections=0))


def test_protect_metrics_goes_into_the_server_command() -> None:
    server = systemd.render(config(protect_metrics=True))[SERVER_UNIT]
    assert lines(server, "ExecStart")[0].endswith(" --protect-metrics")
    assert "--protect-metrics" not in systemd.render(config())[SERVER_UNIT]


def test_root_is_refused_unless_allowed_explicitly(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RefusedError) as err:
        systemd.render(config(user="root"))
    assert "root" in err.value.message and "--allow-root" in (err.value.hint or "")
    with pytest.raises(RefusedError):
        systemd.render(config(user="appliance", group="root"))
    assert install(tmp_path, "--user", "root") == ExitCode.INVALID
    assert "--allow-root" in capsys.readouterr().err and not (tmp_path / "units").exists()
    assert install(tmp_path, "--user", "root", "--allow-root") == 0
    assert "User=root" in (tmp_path / "units" / SERVER_UNIT).read_text()
    assert "warning: the units run as root" in capsys.readouterr().out


def test_remote_install_says_health_and_metrics_are_open(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--host", "0.0.0.0", "--allow-remote") == 0
    assert "/health and /metrics answer without a key" in capsys.readouterr().out
    assert install(tmp_path, "--host", "0.0.0.0", "--allow-remote", "--protect-metrics") == 0
    assert "/health and /metrics answer without a key" not in capsys.readouterr().out


def test_the_defaults_describe_this_installation() -> None:
    found = systemd.code_paths()
    assert Path(sys.prefix).resolve() in found
    assert Path(systemd.__file__).resolve().parent.parent in found  # the package's root
    assert UnitConfig(workspace=WS).python == Path(sys.executable)


# -- the CLI ---------------------------------------------------------------------------------
def install(tmp_path: Path, *extra: str, home: Path = WS) -> int:
    return cli.main(["--home", str(home), "systemd", "install", "--dest", str(tmp_path / "units"),
                     "--artifacts", "demo-gguf-q4_k_m", "--gpu", "none", *extra])


def test_install_writes_both_units_atomically_and_says_what_to_run_next(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--user", "svc-appliance", "--port", "8400") == 0
    out = capsys.readouterr().out
    server = tmp_path / "units" / SERVER_UNIT
    assert server.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "units" / JOB_UNIT).is_file()
    assert not list((tmp_path / "units").glob(".*"))  # no temporary file left
    text = server.read_text()
    assert f"ExecStart={sys.executable} -I -m appliance --home {WS} serve demo-gguf-q4_k_m" in text
    assert "User=svc-appliance" in text and "--port 8400" in text
    for step in ("useradd --system", f"chown -R svc-appliance:svc-appliance {WS}",
                 "systemctl daemon-reload", "systemctl enable --now appliance-server.service",
                 "curl http://127.0.0.1:8400/health", "systemctl start appliance-job@<id>",
                 "journalctl -u appliance-server.service"):
        assert step in out


def test_install_refuses_a_public_host_without_allow_remote(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--host", "0.0.0.0") == ExitCode.INVALID
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "--allow-remote" in err
    assert not (tmp_path / "units").exists()


def test_install_with_allow_remote_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--host", "0.0.0.0", "--allow-remote", "--allow-from",
                   "10.0.0.0/8") == 0
    assert "IPAddressAllow=localhost 10.0.0.0/8" in (tmp_path / "units" / SERVER_UNIT).read_text()
    assert "--allow-remote: the server listens on 0.0.0.0" in capsys.readouterr().out


def test_a_workspace_in_tmp_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, home=Path("/tmp/appliance-ws")) == ExitCode.INVALID
    assert "private, empty /tmp" in capsys.readouterr().err


def test_dry_run_prints_the_units_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert install(tmp_path, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "[Service]" in out and "PrivateNetwork=yes" in out and "IPAddressAllow=localhost" in out
    assert not (tmp_path / "units").exists()


def test_the_default_home_is_the_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("APPLIANCE_HOME", "/var/lib/appliance")
    assert cli.main(["systemd", "install", "--dry-run", "--artifacts", "a", "--gpu", "none"]) == 0
    assert "ReadWritePaths=/var/lib/appliance\n" in capsys.readouterr().out


def test_unreadable_code_paths_are_reported(tmp_path: Path) -> None:
    closed = tmp_path / "venv"
    closed.mkdir(mode=0o750)
    closed.chmod(0o750)
    assert closed in systemd.closed_to_others(config(code_paths=(closed,)))
    closed.chmod(0o755)
    assert closed not in systemd.closed_to_others(config(code_paths=(closed,)))
