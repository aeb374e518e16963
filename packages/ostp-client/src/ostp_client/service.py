"""`ostp-client service install|uninstall|status`: the daemon as a systemd service.

`install` writes a unit that runs `ostp-client run -c CONFIG` (absolute paths) as
`Type=notify`: the daemon says READY=1 once its inbounds listen, pings the watchdog, and
`systemctl reload` sends SIGHUP (the daemon's config reload). The system unit
(`/etc/systemd/system/NAME.service`, as root) keeps the two capabilities a TUN with policy
routing needs (CAP_NET_ADMIN; CAP_NET_BIND_SERVICE for ports below 1024) and nothing more, and
sandboxes the rest; the user unit (`--user`, `~/.config/systemd/user/`) runs with the user's
own rights (a TUN needs the system unit).

`--root DIR` (or `$OSTP_CLIENT_SERVICE_ROOT`) writes below DIR instead of `/` or `$HOME` and does
not call systemctl: for packaging and tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ostp_client.cli import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    command,
    config_path_or_exit,
    load_config_or_exit,
)

__all__ = ["UnitOptions", "render_unit", "unit_path"]

DEFAULT_NAME = "ostp-client"
WATCHDOG_SEC = 30
"""systemd restarts the daemon when its event loop sends no ping for this long."""
ROOT_ENV = "OSTP_CLIENT_SERVICE_ROOT"
SYSTEM_CAPABILITIES = "CAP_NET_ADMIN CAP_NET_BIND_SERVICE"
DOCS = "https://github.com/ostp-py/ostp-py#run-as-a-service"


@dataclass(frozen=True, slots=True)
class UnitOptions:
    command: tuple[str, ...]
    """The `ostp-client` command by absolute path (or `python -m ostp_client`)."""
    config: Path
    """Absolute path of the config file."""
    user: bool
    """A user unit (no capabilities, no system sandbox)."""
    writable: tuple[Path, ...] = ()
    """Directories the daemon writes (a log file's directory) besides its own state dirs."""


def _quote(arg: str) -> str:
    """One ExecStart= word (systemd.service(5) quoting; `%` and `$` are specifiers there)."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if any(c in text for c in " \t\"\\'") or not text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def render_unit(options: UnitOptions) -> str:
    """The unit file's text."""
    command_line = " ".join(_quote(a) for a in (*options.command, "run", "-c", str(options.config)))
    lines = [
        "# Written by `ostp-client service install`; `ostp-client service uninstall` removes it.",
        "[Unit]",
        "Description=OSTP client (SOCKS5/HTTP proxy through an OSTP server)",
        f"Documentation={DOCS}",
    ]
    if not options.user:
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={command_line}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=5",
        f"WatchdogSec={WATCHDOG_SEC}",
        "TimeoutStopSec=20",
        "NoNewPrivileges=yes",
    ]
    if not options.user:
        writable = sorted({str(p) for p in options.writable})
        lines += [
            # the control socket at /run/ostp-client/control.sock (`sudo ostp-client ctl`),
            # state (the system-proxy journal) under /var/lib/ostp-client
            "RuntimeDirectory=ostp-client",
            "RuntimeDirectoryMode=0700",
            "StateDirectory=ostp-client",
            "StateDirectoryMode=0700",
            "Environment=XDG_RUNTIME_DIR=/run XDG_STATE_HOME=/var/lib",
            # a TUN and policy routing (ip route/rule, SO_MARK) need CAP_NET_ADMIN; a listener
            # below port 1024 needs CAP_NET_BIND_SERVICE; nothing else is kept
            f"AmbientCapabilities={SYSTEM_CAPABILITIES}",
            f"CapabilityBoundingSet={SYSTEM_CAPABILITIES}",
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "PrivateTmp=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectControlGroups=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
            "RestrictNamespaces=yes",
            "LockPersonality=yes",
            "DevicePolicy=closed",
            "DeviceAllow=/dev/net/tun rw",
        ]
        if writable:
            lines.append("ReadWritePaths=" + " ".join(_quote(p) for p in writable))
    lines += [
        "",
        "[Install]",
        f"WantedBy={'default.target' if options.user else 'multi-user.target'}",
    ]
    return "\n".join(lines) + "\n"


def _root_override(args: argparse.Namespace) -> Path | None:
    root = args.root or os.environ.get(ROOT_ENV)
    return Path(root) if root else None


def unit_path(name: str, user: bool, root: Path | None = None) -> Path:
    """Where the unit file goes (below `root` instead of `/` or the home directory)."""
    if user:
        xdg = os.environ.get("XDG_CONFIG_HOME", "")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
        if root is not None:
            base = root / base.relative_to(base.anchor)
        return base / "systemd" / "user" / f"{name}.service"
    base = (root or Path("/")) / "etc" / "systemd" / "system"
    return base / f"{name}.service"


def _command() -> tuple[str, ...]:
    """This `ostp-client` by absolute path: the script that runs now (a pipx link, a venv's
    bin/ostp-client; links are kept, so an upgrade in place keeps the unit valid)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "ostp-client" and argv0.is_file():
        return (str(argv0.absolute()),)
    # `python -m ostp_client`: the same interpreter, as a module
    return (str(Path(sys.executable).absolute()), "-m", "ostp_client")


def _writable_by_others(program: Path) -> list[str]:
    """Files and directories on the way to `program` that a user other than root may change."""
    problems = []
    seen: set[Path] = set()
    for path in (program, program.resolve()):
        for item in (path, *path.parents):
            if item in seen:
                continue
            seen.add(item)
            try:
                info = item.lstat()
            except OSError:
                continue
            # group/world-writable counts, except for a link's own mode and sticky dirs (/tmp)
            shared = info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX
            if info.st_uid != 0 or (shared and not stat.S_ISLNK(info.st_mode)):
                problems.append(f"{item} can be changed by a user other than root")
    return problems


def _systemctl(user: bool, *words: str) -> subprocess.CompletedProcess[str] | None:
    """Run systemctl; None when there is none or systemd is not the running init."""
    exe = shutil.which("systemctl")
    if exe is None or not Path("/run/systemd/system").is_dir():
        return None
    argv = [exe, *(["--user"] if user else []), *words]
    return subprocess.run(argv, check=False, capture_output=True, text=True)  # noqa: S603


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", action="store_true", help="a user service (no root needed)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"unit name (default {DEFAULT_NAME})")
    parser.add_argument(
        "--root", default=None, help=f"write below this directory, no systemctl (${ROOT_ENV})"
    )


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="service_command", metavar="ACTION", required=True)
    install = sub.add_parser("install", help="write the unit and reload systemd")
    _add_common(install)
    install.add_argument(
        "-c",
        "--config",
        default=None,
        help="config file the service runs (default: the config `ostp-client run` would use)",
    )
    install.add_argument("--now", action="store_true", help="also enable and start it")
    install.add_argument("-f", "--force", action="store_true", help="replace an existing unit")
    for action, text in (("uninstall", "stop, disable and remove the unit"), ("status", "show it")):
        _add_common(sub.add_parser(action, help=text))


@command("service", "install, remove or show the systemd service", _configure)
def _cmd_service(args: argparse.Namespace) -> int:
    handlers = {"install": _install, "uninstall": _uninstall, "status": _status}
    return handlers[args.service_command](args)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _install(args: argparse.Namespace) -> int:
    if sys.platform != "linux":
        _err("ostp-client service: systemd services exist on Linux only")
        return EXIT_FAILURE
    root = _root_override(args)
    if not args.user and root is None and os.geteuid() != 0:
        _err("a system service needs root (sudo ostp-client service install ...); or use --user")
        return EXIT_FAILURE
    config_path = Path(config_path_or_exit(args.config)).absolute()
    config = load_config_or_exit(str(config_path))  # never install a unit that cannot start
    writable: tuple[Path, ...] = ()
    if config.log.output != "stderr":
        writable = (Path(config.log.output).expanduser().absolute().parent,)
    command_words = _command()
    text = render_unit(UnitOptions(command_words, config_path, args.user, writable))
    if not args.user:
        for problem in _writable_by_others(Path(command_words[0])):
            _err(f"warning: {problem}: the service runs it as root")
    path = unit_path(args.name, args.user, root)
    if path.exists() and path.read_text(encoding="utf-8") != text and not args.force:
        _err(f"{path} exists with other content; use --force to replace it")
        return EXIT_FAILURE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        _err(f"cannot write {path}: {exc.strerror or exc}")
        return EXIT_FAILURE
    print(f"wrote {path}")
    scope = "--user " if args.user else ""
    if root is None:
        if _systemctl(args.user, "daemon-reload") is None:
            print("systemd is not running here; the unit takes effect where it runs.")
            return EXIT_OK
        if args.now:
            result = _systemctl(args.user, "enable", "--now", f"{args.name}.service")
            if result is not None and result.returncode != 0:
                _err(result.stderr.strip() or f"systemctl enable --now {args.name} failed")
                return EXIT_FAILURE
            print(f"enabled and started {args.name}.service")
            return EXIT_OK
    print(f"start it now and at every boot:  systemctl {scope}enable --now {args.name}")
    if args.user:
        print("keep it running after you log out:  loginctl enable-linger")
    print(f"its log:  journalctl {scope}-u {args.name} -f")
    return EXIT_OK


def _uninstall(args: argparse.Namespace) -> int:
    root = _root_override(args)
    path = unit_path(args.name, args.user, root)
    if root is None:
        _systemctl(args.user, "disable", "--now", f"{args.name}.service")
    if not path.exists():
        _err(f"{path}: no such unit")
        return EXIT_FAILURE
    try:
        path.unlink()
    except OSError as exc:
        _err(f"cannot remove {path}: {exc.strerror or exc}")
        return EXIT_FAILURE
    if root is None:
        _systemctl(args.user, "daemon-reload")
    print(f"removed {path}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    root = _root_override(args)
    path = unit_path(args.name, args.user, root)
    if not path.exists():
        _err(f"not installed ({path} does not exist); see: ostp-client service install --help")
        return EXIT_CONFIG
    print(f"unit file: {path}")
    result = None if root is not None else _systemctl(args.user, "status", "--no-pager", args.name)
    if result is None:
        print("systemd is not running here: no service state to show.")
        return EXIT_OK
    sys.stdout.write(result.stdout)
    if result.stderr:
        sys.stderr.write(result.stderr)
    # systemctl status: 0 running, 3 stopped; both are answers, not failures of this command
    return EXIT_OK if result.returncode in (0, 3) else EXIT_FAILURE
