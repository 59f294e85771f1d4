"""Opening an SSH connection to a board, with every failure turned into a one-line DeviceError.

Why paramiko (and not asyncssh, fabric or the system ``ssh``):

* **paramiko** is maintained (the pyca/Fabric maintainers, regular releases), installs from
  wheels everywhere our host side runs, has a synchronous API that fits the runner life cycle
  (``with SshRunner(...)``), SFTP built in, reads the OpenSSH client config (Host aliases,
  HostName, User, Port, IdentityFile, ProxyCommand) and ``known_hosts``, bounds every phase
  with its own timeout (TCP connect, banner, auth, channel) and reports each failure as a
  distinct exception type (``NoValidConnectionsError``, ``AuthenticationException``,
  ``BadHostKeyException``, ``socket.timeout``), which is what lets us say *which* thing failed.
* **asyncssh** is also maintained and more complete (ProxyJump, certificates), but asyncio-only:
  every call of a synchronous runner would need an event loop around it, for no gain here.
* **fabric** is paramiko plus a task runner and invoke's shell layer we do not need.
* **system ssh/scp** through subprocess honours all of ``~/.ssh/config``, but every failure is
  exit code 255 plus locale- and version-dependent text on stderr, which would have to be
  parsed to tell a refused connection from a wrong key; it also needs ``BatchMode`` tricks
  so that a password or host-key prompt can never hang the command.

Host keys: checked against ``known_hosts`` like OpenSSH's ``StrictHostKeyChecking``
(``yes`` rejects unknown hosts, ``accept-new`` appends a new host's key to the file and rejects
changed keys, ``no`` accepts anything). The file is only ever appended to, never rewritten
(paramiko's own AutoAddPolicy rewrites it and may drop lines it does not understand).
"""
from __future__ import annotations

import errno
import getpass
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune._lazy import require
from edgeprune.devices.profile import DeviceProfile
from edgeprune.errors import DeviceError, UserError
from edgeprune.io import check_input_file

log = logging.getLogger(__name__)

DEFAULT_SSH_CONFIG = "~/.ssh/config"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
KEEPALIVE_S = 15


@dataclass(frozen=True)
class SshTarget:
    """Where to connect, after merging the profile with the SSH config (profile wins)."""

    hostname: str
    port: int
    user: str
    key_files: tuple[str, ...]      # explicit keys; empty: agent and ~/.ssh/id_* are tried
    explicit_key: bool              # the profile named a key: use only that one
    proxy_command: str | None

    def label(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def _ssh_config_entry(profile: DeviceProfile) -> dict[str, Any]:
    """The SSH config's settings for ``profile.host`` ({} when there is no config file)."""
    paramiko = require("paramiko")
    path = Path(profile.ssh_config or DEFAULT_SSH_CONFIG).expanduser()
    if not path.is_file():
        if profile.ssh_config:
            raise DeviceError(f"device {profile.name}: ssh_config {path} does not exist; fix the path "
                              f"or remove 'ssh_config' from {profile.source}")
        return {}
    try:
        entry = dict(paramiko.SSHConfig.from_path(str(path)).lookup(profile.host))
    except (OSError, paramiko.ssh_exception.ConfigParseError) as exc:
        raise DeviceError(f"device {profile.name}: cannot read SSH config {path}: {exc}") from exc
    if "proxyjump" in entry:
        raise DeviceError(f"device {profile.name}: SSH config {path} uses ProxyJump for {profile.host}, "
                          f"which paramiko does not support; use 'ProxyCommand ssh -W %h:%p "
                          f"{entry['proxyjump']}' instead")
    return entry


def _check_private_key(profile: DeviceProfile, key: Path) -> None:
    """Read ``key_file`` before connecting: a garbage file used to be blamed on the server, after its
    host key had already been added to known_hosts. An encrypted key passes (the login says so)."""
    paramiko = require("paramiko")
    try:
        check_input_file(key, "key_file", max_bytes=1 << 20)
        paramiko.PKey.from_path(str(key))
    except paramiko.PasswordRequiredException:
        return
    except (paramiko.SSHException, ValueError, OSError, UnicodeDecodeError, UserError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceError(f"device {profile.name}: key_file {key} is not a private key ({reason}); fix 'key_file' "
                          f"in {profile.source} (the private half, not .pub) or create one with: "
                          f"ssh-keygen -t ed25519 -f {key}") from exc


def resolve_target(profile: DeviceProfile) -> SshTarget:
    """Merge the profile with its SSH config entry; profile values win, as on ssh's command line."""
    if profile.host is None:
        raise DeviceError(f"device {profile.name} has no 'host'; set it in {profile.source}")
    entry = _ssh_config_entry(profile)
    if profile.key_file:
        key = Path(profile.key_file).expanduser()
        if not key.is_file():
            raise DeviceError(f"device {profile.name}: key_file {key} does not exist; fix 'key_file' in "
                              f"{profile.source} or create a key with: ssh-keygen -t ed25519 -f {key}")
        _check_private_key(profile, key)
        keys: tuple[str, ...] = (str(key),)
    else:
        keys = tuple(str(Path(k).expanduser()) for k in entry.get("identityfile", [])
                     if Path(k).expanduser().is_file())
    return SshTarget(
        hostname=entry.get("hostname", profile.host),
        port=int(profile.port or entry.get("port", 22)),
        user=profile.user or entry.get("user") or getpass.getuser(),
        key_files=keys, explicit_key=bool(profile.key_file),
        proxy_command=entry.get("proxycommand"),
    )


def quiet_paramiko() -> None:
    """paramiko logs every connect and SFTP session at INFO; keep that out of our output
    unless the user configured paramiko's logger (``-v`` shows it via edgeprune's DEBUG)."""
    logger = logging.getLogger("paramiko")
    if logger.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)


def _host_key_policy(profile: DeviceProfile, known_hosts: Path) -> Any:
    paramiko = require("paramiko")
    if profile.host_key_check == "yes":
        return paramiko.RejectPolicy()

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        """Trust a host seen for the first time; remember it (``accept-new``) or not (``no``)."""

        def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
            client.get_host_keys().add(hostname, key.get_name(), key)
            if profile.host_key_check == "no":
                return
            known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(known_hosts, "a", encoding="ascii") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            log.info("added host key of %s (%s) to %s", hostname, key.get_name(), known_hosts)

    return AcceptNew()


def _connect_kwargs(target: SshTarget, timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        hostname=target.hostname, port=target.port, username=target.user, timeout=timeout,
        banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
        key_filename=list(target.key_files) or None,
        allow_agent=not target.explicit_key, look_for_keys=not target.explicit_key,
    )
    if target.proxy_command:
        paramiko = require("paramiko")
        kwargs["sock"] = paramiko.ProxyCommand(target.proxy_command)
    return kwargs


def connect(profile: DeviceProfile) -> Any:
    """An authenticated ``paramiko.SSHClient`` for ``profile``, or a one-line DeviceError."""
    paramiko = require("paramiko")
    quiet_paramiko()
    target = resolve_target(profile)
    known_hosts = Path(profile.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
    client = paramiko.SSHClient()
    if known_hosts.is_file():
        # HostKeys.load, not client.load_host_keys: paramiko would rewrite the file on save.
        client.get_host_keys().load(str(known_hosts))
    client.set_missing_host_key_policy(_host_key_policy(profile, known_hosts))
    log.debug("connecting to %s (device %s)", target.label(), profile.name)
    try:
        client.connect(**_connect_kwargs(target, profile.connect_timeout_s))
    except BaseException as exc:
        client.close()
        if isinstance(exc, Exception):
            raise connection_error(profile, target, exc, known_hosts) from exc
        raise
    client.get_transport().set_keepalive(KEEPALIVE_S)
    return client


def _socket_message(exc: OSError, where: str, timeout: float) -> str | None:
    codes = {getattr(exc, "errno", None)} | {getattr(e, "errno", None)
                                             for e in getattr(exc, "errors", {}).values()}
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host name of {where} ({exc.strerror}); check 'host' or the SSH config HostName"
    if isinstance(exc, socket.timeout) or errno.ETIMEDOUT in codes:
        return (f"no answer from {where} within {timeout:g} s (board off, wrong address or firewalled); "
                f"check the address and that the board is up, or raise connect_timeout_s")
    if errno.ECONNREFUSED in codes:
        return (f"connection refused by {where}: nothing listens on that port; start sshd on the board "
                f"(sudo systemctl start ssh) or fix 'port'")
    if codes & {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}:
        return f"{where} is unreachable (no route to host); check the network and the board's address"
    return None


def connection_error(profile: DeviceProfile, target: SshTarget, exc: Exception,
                     known_hosts: Path) -> DeviceError:
    """Map a paramiko/socket failure of ``connect`` to a DeviceError saying how to fix it."""
    paramiko = require("paramiko")
    where = f"device {profile.name} ({target.label()})"
    if isinstance(exc, paramiko.BadHostKeyException):
        return DeviceError(f"host key of {where} changed since it was stored in {known_hosts}; if the board "
                           f"was reinstalled run: ssh-keygen -f {known_hosts} -R '[{target.hostname}]:{target.port}'")
    if isinstance(exc, paramiko.PasswordRequiredException):
        return DeviceError(f"the private key for {where} is encrypted; add it to ssh-agent (ssh-add KEY) "
                           f"and remove 'key_file' from the profile")
    if isinstance(exc, paramiko.AuthenticationException):
        keys = ", ".join(target.key_files) or "ssh-agent and ~/.ssh/id_*"
        return DeviceError(f"authentication failed for {where} with {keys}; install the public key on the "
                           f"board (ssh-copy-id -i KEY.pub -p {target.port} {target.user}@{target.hostname}) "
                           f"or fix 'user'/'key_file'")
    if isinstance(exc, OSError):
        message = _socket_message(exc, where, profile.connect_timeout_s)
        if message is not None:
            return DeviceError(message)
    if isinstance(exc, paramiko.SSHException) and "No authentication methods available" in str(exc):
        return DeviceError(f"no SSH key to log in to {where}: set 'key_file' in {profile.source}, add an "
                           f"IdentityFile for it to ~/.ssh/config, or load a key into ssh-agent")
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return DeviceError(f"host key of {where} is not in {known_hosts} and host_key_check is 'yes'; "
                           f"connect once with ssh -p {target.port} {target.user}@{target.hostname} to accept "
                           f"it, or set host_key_check to 'accept-new'")
    if isinstance(exc, (paramiko.SSHException, EOFError)):
        return DeviceError(f"SSH handshake with {where} failed within {profile.connect_timeout_s:g} s: "
                           f"{exc or type(exc).__name__}; is it an SSH server on that port?")
    return DeviceError(f"cannot connect to {where}: {type(exc).__name__}: {exc}")


def home_relative(path: str) -> str:
    """``~/x`` -> ``x`` (SFTP and exec commands start in the login user's home)."""
    if path == "~":
        return "."
    return path[2:] if path.startswith("~/") else path


def remote_join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)

