"""systemd units for the server and for jobs, written with this installation's real paths.

`systemd/appliance-server.service` and `systemd/appliance-job@.service` are templates with @NAME@
placeholders. `appliance systemd install` fills them with the interpreter that runs this command,
the workspace (`--home`), a dedicated user and the server's address, and writes them atomically;
`appliance systemd verify` checks them with `systemd-analyze verify` and reports their
`systemd-analyze security` exposure. The units sandbox hard (read-only system, the workspace as the
only writable path, loopback-only IP, no network at all for jobs), so rendering computes what must
stay visible: when the interpreter, the package or the workspace lives under /home, /root or
/run/user, those directories are bound back into an otherwise empty home.

Promises: a rendered unit has no placeholder left; the server listens on loopback unless the
operator says `--allow-remote`, and then the unit's IP allow-list says the same; paths that a unit
file cannot carry safely (spaces, quotes, `%`, `$`, ...) are refused, not escaped and hoped for;
the units never run as root (user or group) unless `--allow-root` says so, with a warning; the
server's `LimitNOFILE` is its `--max-connections` plus `FD_RESERVE`, so the connection cap is
reached before the descriptor limit. Only the standard library is imported here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, NotFoundError, RefusedError, ValidationError
from appliance.runtime import DEFAULT_PORT
from appliance.runtime.limits import DEFAULT_MAX_CONNECTIONS, FD_RESERVE

SERVER_UNIT = "appliance-server.service"
JOB_UNIT = "appliance-job@.service"
UNITS = (SERVER_UNIT, JOB_UNIT)
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "systemd"
DEFAULT_DEST = Path("/etc/systemd/system")
DEFAULT_USER = "appliance"
# ProtectHome= hides these; what the units need from them is bound back read-only.
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))
# PrivateTmp= replaces these with empty private directories: a workspace there would vanish.
PRIVATE_DIRS = (Path("/tmp"), Path("/var/tmp"))
GPU_CHOICES = ("auto", "none", "jobs", "all")
PLACEHOLDER_RE = re.compile(r"@[A-Z][A-Z_]*@")
# Characters a path may hold and still be written into a unit file verbatim (no quoting, no
# specifier or variable expansion, no list or bind-mount separators).
SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._+/@=,~-]*$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
SCORE_RE = re.compile(r"Overall exposure level for \S+: ([0-9.]+) (\w+)")


@dataclass(frozen=True)
class UnitConfig:
    """Everything the two units are rendered from."""

    workspace: Path
    python: Path = field(default_factory=lambda: Path(sys.executable))
    user: str = DEFAULT_USER
    group: str | None = None
    artifacts: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow_remote: bool = False
    allow_from: tuple[str, ...] = ()
    gpu: str = "auto"
    code_paths: tuple[Path, ...] = field(default_factory=lambda: code_paths())
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    protect_metrics: bool = False
    allow_root: bool = False


# -- what the units must see -------------------------------------------------------------------
def code_paths() -> tuple[Path, ...]:
    """Directories the interpreter reads: the venv, the base Python, sys.path and the package
    roots (an editable install lives in its source tree)."""
    found = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent]
    found += [Path(p) for p in sys.path if p and os.path.isabs(p) and os.path.isdir(p)]
    for package in ("appliance", "export"):
        spec = importlib.util.find_spec(package)
        for location in (spec and spec.submodule_search_locations) or ():
            found.append(Path(location).parent)
    return tuple(dict.fromkeys(p.resolve() for p in found))


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _outermost(paths: list[Path]) -> list[Path]:
    """The paths that are not inside another one of them, sorted."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(q != p and q in p.parents for q in unique)]


def home_binds(config: UnitConfig) -> tuple[str, list[str]]:
    """ProtectHome= and the bind lines that bring back what lives under a home directory."""
    code = _outermost([p for p in config.code_paths if _under(p, HOME_DIRS)])
    workspace = config.workspace if _under(config.workspace, HOME_DIRS) else None
    code = [p for p in code if not (workspace and (p == workspace or workspace in p.parents))]
    if not code and workspace is None:
        return "yes", ["# (nothing under /home, /root or /run/user to bind back)"]
    lines = [f"BindReadOnlyPaths={p}" for p in code]
    if workspace is not None:
        lines.append(f"BindPaths={workspace}")
    return "tmpfs", lines


def gpu_targets(gpu: str) -> set[str]:
    """Which units get the NVIDIA device nodes: `auto` gives them to jobs when the host has some."""
    if gpu == "auto":
        gpu = "jobs" if Path("/dev/nvidiactl").exists() else "none"
    return {"none": set(), "jobs": {JOB_UNIT}, "all": {JOB_UNIT, SERVER_UNIT}}[gpu]


def device_lines(with_gpu: bool) -> str:
    if not with_gpu:
        return "PrivateDevices=yes"
    # The host /dev stays, but the device controller opens only the pseudo devices and the NVIDIA
    # groups of /proc/devices (nvidia, nvidiactl, nvidia-uvm, nvidia-caps, ...).
    return "PrivateDevices=no\nDevicePolicy=closed\nDeviceAllow=char-nvidia* rw"


# -- checks ------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ip_allow(config: UnitConfig) -> str:
    """The IPAddressAllow= value: loopback only, unless the operator opened it."""
    if not config.allow_remote:
        return "localhost"
    return " ".join(("localhost", *config.allow_from)) if config.allow_from else "any"


def check_config(config: UnitConfig) -> None:
    """Refuse what would make a unit unsafe or broken, each with what to do instead."""
    _check_path(config.python, "the interpreter")
    _check_path(config.workspace, "the workspace")
    for path in config.code_paths:
        if _under(path, HOME_DIRS):  # only these are written into the units
            _check_path(path, "a directory the interpreter reads")
    _check_name(config.user, "--user")
    if config.group:
        _check_name(config.group, "--group")
    _check_root(config)
    _check_artifacts(config.artifacts)
    if not 1 <= config.max_connections <= 1_000_000:
        raise ValidationError(f"--max-connections {config.max_connections} is out of range",
                              hint=f"1 to 1000000 (default {DEFAULT_MAX_CONNECTIONS})")
    _check_address(config)
    if config.gpu not in GPU_CHOICES:
        raise ValidationError(f"--gpu {config.gpu!r} is not one of {', '.join(GPU_CHOICES)}",
                              hint="auto gives the NVIDIA devices to jobs when the host has some")


def _check_path(path: Path, what: str) -> None:
    if not path.is_absolute() or not SAFE_PATH_RE.match(str(path)):
        raise ValidationError(
            f"{what} {str(path)!r} cannot be written into a unit file as it is",
            hint="use an absolute path of letters, digits and . _ - + / (no spaces, quotes, %, $ "
                 "or :); e.g. --home /srv/appliance")


def check_workspace_location(workspace: Path) -> None:
    """A workspace under /tmp would be replaced by the units' private /tmp."""
    if _under(workspace, PRIVATE_DIRS):
        raise ValidationError(
            f"the workspace {workspace} is under {', '.join(map(str, PRIVATE_DIRS))}, which the "
            "units replace with a private, empty /tmp",
            hint="use a persistent directory, e.g. `appliance --home /srv/appliance systemd "
                 "install`")


def _check_name(name: str, flag: str) -> None:
    if not USER_RE.match(name):
        raise ValidationError(f"{flag} {name!r} is not a valid user or group name",
                              hint="use lower-case letters, digits, '_' or '-' (e.g. appliance)")


def _is_root(user: str | None, group: str | None) -> bool:
    """root by name, or an account or group with id 0 on this machine."""
    import grp
    import pwd

    def uid(name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def gid(name: str) -> int | None:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            return None

    return user == "root" or group == "root" or (user is not None and uid(user) == 0) or \
        (group is not None and gid(group) == 0)


def _check_root(config: UnitConfig) -> None:
    if config.allow_root or not _is_root(config.user, config.group):
        return
    who = f"--user {config.user}" if _is_root(config.user, None) else f"--group {config.group}"
    raise RefusedError(f"{who}: the units would run as root, and a server or a training job as "
                       "root turns any flaw in them into a flaw of the whole machine",
                       hint="use a dedicated unprivileged user (the default, appliance); if you "
                            "must, add --allow-root")


def _check_artifacts(artifacts: tuple[str, ...]) -> None:
    from appliance.workspace import check_name

    if not artifacts:
        raise ValidationError(
            "the server needs at least one artifact to serve",
            hint="name them with --artifacts NAME[,NAME...]; `appliance exports list` shows them")
    for name in artifacts:
        check_name(name, "artifact name")


def _check_address(config: UnitConfig) -> None:
    if not 1 <= config.port <= 65535:
        raise ValidationError(f"--port {config.port} is not a TCP port", hint="use 1024-65535")
    if config.port < 1024:
        raise ValidationError(f"--port {config.port} needs a privilege the unit does not have",
                              hint=f"use a port from 1024 up (default {DEFAULT_PORT})")
    if not (is_loopback(config.host) or config.allow_remote):
        raise ValidationError(
            f"--host {config.host} is not a loopback address: the server would be reachable "
            "from other machines",
            hint="keep the default 127.0.0.1 (put a reverse proxy in front), or add "
                 "--allow-remote [--allow-from CIDR,...] to open the unit's IP allow-list")
    if config.host != "localhost":
        _parse_ip(config.host, "--host")
    for cidr in config.allow_from:
        _parse_ip(cidr, "--allow-from")


def _parse_ip(text: str, flag: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValidationError(f"{flag} {text!r} is not an IP address or network",
                              hint="give numbers (e.g. 127.0.0.1, 10.0.0.0/8, ::1); the appliance "
                                   "resolves no host names") from exc


# -- rendering ---------------------------------------------------------------------------------
def render(config: UnitConfig) -> dict[str, str]:
    """Both units' text, keyed by unit file name."""
    check_config(config)
    protect_home, binds = home_binds(config)
    gpu = gpu_targets(config.gpu)
    common = {
        "PYTHON": str(config.python), "WORKSPACE": str(config.workspace), "USER": config.user,
        "GROUP": config.group or config.user, "PROTECT_HOME": protect_home,
        "HOME_BINDS": "\n".join(binds), "DOCS": str(TEMPLATE_DIR / "README.md"),
        "ARTIFACTS": " ".join(config.artifacts), "HOST": config.host, "PORT": str(config.port),
        "IP_ALLOW": ip_allow(config), "MAX_CONNECTIONS": str(config.max_connections),
        "SERVE_FLAGS": " --protect-metrics" if config.protect_metrics else "",
        "NOFILE": str(config.max_connections + FD_RESERVE)}
    return {unit: _fill(_template(unit), {**common, "DEVICES": device_lines(unit in gpu)})
            for unit in UNITS}


def _template(unit: str) -> str:
    path = TEMPLATE_DIR / unit
    try:
        return path.read_text()
    except OSError as exc:
        raise ApplianceError(f"the unit template {path} is missing: {exc.strerror}",
                             title="Installation incomplete",
                             hint="run from the appliance source tree (scripts/setup.sh installs "
                                  "it editable), which ships systemd/") from exc


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if left := sorted(set(PLACEHOLDER_RE.findall(text))):
        raise ApplianceError(f"unit template placeholders left unfilled: {', '.join(left)}",
                             title="Template error", hint="this is a bug in systemd/; report it")
    return text


def write_units(units: dict[str, str], dest: Path) -> list[Path]:
    """Write each unit atomically (temp file in the same directory, then rename), mode 0644."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        return [_write_atomic(dest / name, text) for name, text in units.items()]
    except PermissionError as exc:
        raise ApplianceError(f"cannot write to {dest}: {exc.strerror}", title="Permission denied",
                             hint="run as root (sudo), or write elsewhere with --dest DIR") from exc


def _write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# -- systemd-analyze ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Analysis:
    """What systemd-analyze said about one unit file."""

    unit: str
    verify_ok: bool
    verify_output: str
    score: float | None
    verdict: str
    security_output: str


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        raise ApplianceError("systemd-analyze is not installed", title="Tool missing",
                             hint="install systemd's tools (Debian/Ubuntu: apt-get install systemd)")
    return tool


def analyze(path: Path) -> Analysis:
    """`systemd-analyze verify` (a template is checked as an instance) and the offline
    `systemd-analyze security` exposure of one unit file. Neither needs systemd running."""
    tool = systemd_analyze()
    verify = subprocess.run([tool, "verify", "--man=no", str(path)], capture_output=True,
                            text=True, timeout=120)
    out = (verify.stdout + verify.stderr).strip()
    security = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(path)],
                              capture_output=True, text=True, timeout=120)
    match = SCORE_RE.search(security.stdout)
    return Analysis(path.name, verify.returncode == 0 and not out, out,
                    float(match.group(1)) if match else None, match.group(2) if match else "?",
                    (security.stdout + security.stderr).strip())


# -- the commands ------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace) -> UnitConfig:
    from appliance.workspace import default_home

    workspace = Path(os.path.abspath(Path(args.home).expanduser() if args.home else default_home()))
    return UnitConfig(
        workspace=workspace, user=args.user, group=args.group,
        artifacts=tuple(a for a in (args.artifacts or "").split(",") if a), host=args.host,
        port=args.port, allow_remote=args.allow_remote,
        allow_from=tuple(c for c in (args.allow_from or "").split(",") if c), gpu=args.gpu,
        max_connections=args.max_connections, protect_metrics=args.protect_metrics,
        allow_root=args.allow_root)


def cmd_install(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_workspace_location(config.workspace)
    units = render(config)
    if args.dry_run:
        for name, text in units.items():
            print(f"# ---- {Path(args.dest) / name}\n{text}")
        return 0
    for path in write_units(units, Path(args.dest)):
        print(f"wrote {path}")
    for line in next_steps(config, Path(args.dest)):
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.dest:
        paths = [Path(args.dest) / name for name in UNITS]
        if missing := [str(p) for p in paths if not p.is_file()]:
            raise NotFoundError(f"no unit file at {', '.join(missing)}", title="Not installed",
                                hint="`appliance systemd install --dest DIR` writes them")
        return _report([analyze(p) for p in paths])
    config = config_from_args(args)
    if not config.artifacts:
        config = dataclasses.replace(config, artifacts=("example-artifact",))
    with tempfile.TemporaryDirectory(prefix="appliance-units-") as tmp:
        return _report([analyze(p) for p in write_units(render(config), Path(tmp))])


def _report(results: list[Analysis]) -> int:
    for r in results:
        print(f"{r.unit}: systemd-analyze verify {'passed' if r.verify_ok else 'FAILED'}")
        if r.verify_output:
            print("  " + r.verify_output.replace("\n", "\n  "))
        score = f"{r.score:.1f} {r.verdict}" if r.score is not None else "not reported"
        print(f"{r.unit}: systemd-analyze security exposure {score}")
    if failed := [r.unit for r in results if not r.verify_ok]:
        raise ApplianceError(f"systemd-analyze verify found problems in {', '.join(failed)}",
                             title="Units do not verify", hint="see its messages above")
    return 0


def next_steps(config: UnitConfig, dest: Path) -> list[str]:
    """What the operator runs next, as root, in order."""
    group = config.group or config.user
    ws, user = config.workspace, config.user
    # The CLI should run as the service user, so that what it writes stays the service's; that
    # needs the interpreter to be reachable outside the units' sandbox too.
    runner = "" if closed_to_others(config) else f"sudo -u {user} "
    cli = f"{runner}{config.python} -m appliance --home {ws}"
    lines = ["", "next, as root:"]
    if not _user_exists(user):
        lines.append(f"  useradd --system --user-group --home-dir {ws} --no-create-home "
                     f"--shell /usr/sbin/nologin {user}")
    lines += [f"  mkdir -p {ws} && chown -R {user}:{group} {ws}",
              "  systemctl daemon-reload",
              f"  systemctl enable --now {SERVER_UNIT}",
              f"  systemctl status {SERVER_UNIT}; journalctl -u {SERVER_UNIT} -f",
              f"  curl http://{_url_host(config.host)}:{config.port}/health",
              "run a queued job through the job unit (no network), and follow it:",
              "  systemctl start appliance-job@<id>",
              f"  {cli} jobs logs <id> --follow"]
    if dest != DEFAULT_DEST:
        lines.insert(1, f"(the units are in {dest}; systemd reads {DEFAULT_DEST}: copy or link "
                        "them there first)")
    return lines + _warnings(config)


def _user_exists(user: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _warnings(config: UnitConfig) -> list[str]:
    lines = []
    if _is_root(config.user, config.group):
        lines.append("warning: the units run as root (--allow-root): the sandbox still applies, but "
                     "a flaw in the server or a job is a flaw of the whole machine")
    if gpu := sorted(gpu_targets(config.gpu)):
        lines.append(f"note: {' and '.join(gpu)} may open the NVIDIA devices (--gpu {config.gpu})")
    if config.allow_remote:
        lines.append(f"note: --allow-remote: the server listens on {config.host} and its unit "
                     f"accepts IP traffic from {ip_allow(config)}; keep API keys on and a firewall "
                     "in front")
        if not config.protect_metrics:
            lines.append("note: /health and /metrics answer without a key (model names, request "
                         "and token counts); install with --protect-metrics to put them behind one")
    if closed := closed_to_others(config, in_units=True):
        lines.append(f"warning: the service user cannot pass through {', '.join(map(str, closed))} "
                     "(no o+x): the units will not start; chmod o+rx them or install elsewhere")
    elif closed := closed_to_others(config):
        lines.append(f"note: outside the units the service user cannot reach {closed[0]}; run the "
                     f"CLI as root, or install the appliance outside /home and /root (e.g. /opt) so "
                     f"`sudo -u {config.user} appliance ...` works")
    return lines


def closed_to_others(config: UnitConfig, *, in_units: bool = False) -> list[Path]:
    """Directories the service user cannot pass through (no o+x) on the way to the code. Inside
    the units a directory under a home counts alone: they bind it into a fresh tmpfs home."""
    found: set[Path] = set()
    for path in _outermost(list(config.code_paths)):
        chain = [path] if in_units and _under(path, HOME_DIRS) else [path, *path.parents]
        found.update(d for d in chain if d.is_dir() and not d.stat().st_mode & 0o001)
    return sorted(found)


def _add_render_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default=DEFAULT_USER, help="the service user (default: appliance)")
    p.add_argument("--group", help="the service group (default: same as --user)")
    p.add_argument("--artifacts", metavar="A,B", help="exports the server serves")
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default {DEFAULT_PORT})")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --host and open the unit's IP allow-list")
    p.add_argument("--allow-from", metavar="CIDR,...",
                   help="with --allow-remote: the only networks allowed in (default: any)")
    p.add_argument("--gpu", choices=GPU_CHOICES, default="auto",
                   help="units that may open the NVIDIA devices (auto: jobs, when the host has one)")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help="the server's connection cap; LimitNOFILE is set to N + "
                        f"{FD_RESERVE} (default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--protect-metrics", action="store_true",
                   help="the server's /health and /metrics need an API key too")
    p.add_argument("--allow-root", action="store_true",
                   help="let --user or --group be root (refused otherwise; not recommended)")


def register(sub: Any) -> None:
    """Add `appliance systemd ...` to the `appliance` parser."""
    group = sub.add_parser("systemd", help="install and check the hardened systemd units")
    gsub = group.add_subparsers(metavar="ACTION", required=True)
    p = gsub.add_parser("install", help="write the server and job units with this installation's "
                                        "paths")
    p.add_argument("--dest", default=str(DEFAULT_DEST), help=f"directory (default {DEFAULT_DEST})")
    p.add_argument("--dry-run", action="store_true", help="print the units, write nothing")
    _add_render_options(p)
    p.set_defaults(func=cmd_install)
    p = gsub.add_parser("verify", help="systemd-analyze verify + security on the units")
    p.add_argument("--dest", help="check the units installed there (default: render them afresh)")
    _add_render_options(p)
    p.set_defaults(func=cmd_verify)
