"""The admin key that guards tritonserver's model-repository API (load, unload, index) under `chorus serve`.

Inference, health, metadata, model config and metrics stay open; loading and unloading models (`chorus task
add|remove`, `chorus distill --url`, `ChorusClient.add_task`) need the key, sent as the header `admin-key` (HTTP) or
`triton-grpc-protocol-admin-key` (gRPC). Where the key comes from:

- given: `chorus serve --admin-key KEY` or `CHORUS_ADMIN_KEY=KEY` (required when the server listens beyond loopback);
- otherwise `chorus serve` keeps one in a file only its user can read: `$CHORUS_ADMIN_KEY_FILE`, else
  `$XDG_STATE_HOME/chorus/admin-key`, else `~/.local/state/chorus/admin-key`. The first start creates it (mode 0600,
  atomically), later starts reuse it; deleting it and restarting the server rotates it.

Clients (`chorus task ...`, `ChorusClient`) with no key given use `CHORUS_ADMIN_KEY`, else that file, and the file
only for a server on a loopback address: a key of this machine is never sent to another host.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from chorus.errors import ChorusError

KEY_ENV = "CHORUS_ADMIN_KEY"
KEY_FILE_ENV = "CHORUS_ADMIN_KEY_FILE"
KEY_BYTES = 32  # secrets.token_urlsafe(32): 43 characters of [A-Za-z0-9_-]
_MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def key_file(env: Mapping[str, str] | None = None) -> Path:
    """Where `chorus serve` keeps its generated key: $CHORUS_ADMIN_KEY_FILE, else the XDG state folder's
    `chorus/admin-key` ($XDG_STATE_HOME when it is an absolute path, else ~/.local/state)."""
    env = os.environ if env is None else env
    explicit = env.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    state = env.get("XDG_STATE_HOME", "")
    base = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local" / "state"
    return base / "chorus" / "admin-key"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1 and `localhost`; False for 0.0.0.0, ::, other
    addresses and names."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str:
    """The host of a `host:port` (or `[v6]:port`) address."""
    if url.startswith("["):
        return url[1:].split("]", 1)[0]
    return url.rsplit(":", 1)[0] if url.count(":") == 1 else url


def check_key(key: str, source: str) -> str:
    """`key` if it can travel as an HTTP header value and a tritonserver flag; else ChorusError naming `source`."""
    if not key or not all(c.isascii() and c.isprintable() and not c.isspace() for c in key):
        raise ChorusError(f"the admin key from {source} is empty or holds spaces or non-ASCII characters; it travels "
                          f"as an HTTP header. Fix: use letters, digits, '-' and '_', e.g. the output of {_MAKE_ONE}")
    return key


def read_key_file(path: Path) -> str | None:
    """The key stored at `path`, None if there is no file. Raises ChorusError if the file is not a regular file of
    this user that only this user can read (as ssh does for private keys), or holds no valid key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChorusError(f"cannot read the admin key file {path}: {exc}. Fix: make it a regular file of this user "
                          f"(chmod 600 {path}), or delete it so that `chorus serve` writes a new one") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ChorusError(f"the admin key file {path} is not a regular file. Fix: delete it; `chorus serve` "
                              "writes a new one")
        if st.st_uid != os.geteuid():
            raise ChorusError(f"the admin key file {path} belongs to uid {st.st_uid}, not to this user (uid "
                              f"{os.geteuid()}). Fix: run as its owner, pass the key with --admin-key / {KEY_ENV}, "
                              f"or point {KEY_FILE_ENV} at a key file of this user")
        if st.st_mode & 0o077:
            raise ChorusError(f"the admin key file {path} can be read by other users (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}). Fix: chmod 600 {path}, or delete it and restart "
                              "`chorus serve` to get a new key")
        with os.fdopen(fd, "r", encoding="ascii", errors="replace") as f:
            fd = -1
            text = f.read(4096)
    finally:
        if fd >= 0:
            os.close(fd)
    return check_key(text.strip(), str(path))


def _write_new(path: Path, key: str) -> bool:
    """Write `key` to `path` unless a file is there already; True if this call wrote it. The file appears whole or
    not at all (written to a private temporary name, then hard-linked into place, which fails if the name exists)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False  # another `chorus serve` created it first: use that one
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create(path: Path) -> tuple[str, bool]:
    """(the key at `path`, whether this call created it). A missing file is created with a fresh
    `secrets.token_urlsafe` key, mode 0600, in a folder made 0700 when this call makes it."""
    key = read_key_file(path)
    if key is not None:
        return key, False
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = _write_new(path, secrets.token_urlsafe(KEY_BYTES))
    except OSError as exc:
        raise ChorusError(f"cannot create the admin key file {path}: {exc}. Fix: set {KEY_FILE_ENV} to a path in a "
                          f"folder this user can write, or pass a key with --admin-key / {KEY_ENV}") from None
    key = read_key_file(path)
    if key is None:
        raise ChorusError(f"the admin key file {path} disappeared while it was being created; start again")
    return key, created


@dataclasses.dataclass(frozen=True)
class ServerKey:
    """The key a server runs with: `file` is where it is kept (None: given explicitly); `created`: written now."""

    value: str
    file: Path | None
    created: bool = False

    def __repr__(self) -> str:  # never the key itself
        return f"ServerKey(file={self.file!r}, created={self.created})"


def server_key(explicit: str | None, host: str, path: Path | None = None) -> ServerKey:
    """The admin key for a server bound to `host`: `explicit` if given; else, on a loopback address, the key file's
    (created on first use). Listening beyond loopback without an explicit key is refused: remote clients cannot read
    this machine's key file, so the operator chooses the key and hands it to them."""
    if explicit:
        return ServerKey(check_key(explicit, f"--admin-key / {KEY_ENV}"), None)
    if not is_loopback(host):
        raise ChorusError(
            f"refusing to listen on {host!r} without an explicit admin key: beyond this machine, anyone who reaches "
            "the port could load models (and run their code) through tritonserver's repository API. Fix: choose a "
            f"key and pass it: `chorus serve --host {host} --admin-key KEY` or {KEY_ENV}=KEY (`make serve "
            f"HOST={host} ADMIN_KEY=KEY`; a random key: {_MAKE_ONE}); clients pass the same key "
            f"(--admin-key / {KEY_ENV}). Or listen on 127.0.0.1 only.")
    path = key_file() if path is None else path
    value, created = load_or_create(path)
    return ServerKey(value, path, created)


def client_key(url: str, env: Mapping[str, str] | None = None) -> str | None:
    """The key a client uses when none is given: $CHORUS_ADMIN_KEY, else the key file of this machine's
    `chorus serve` when `url` is on a loopback address and the file exists; else None (no key sent)."""
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        return check_key(env[KEY_ENV], KEY_ENV)
    if not is_loopback(url_host(url)):
        return None
    return read_key_file(key_file(env))
