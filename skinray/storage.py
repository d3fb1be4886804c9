"""Where skinray reads and writes: local paths and object-store URIs alike, through pyarrow.fs.

The one module that touches the filesystem layer. Every stage names its inputs and outputs as a
location: a local path or a URI pyarrow.fs understands (`s3://bucket/runs?region=us-east-1`,
`gs://...`, `hdfs://...`), options in the query. Here they become (filesystem, path) pairs, and
here every write is made safe to interrupt:

* A file written with `write_bytes` / `write_text` / `write_json` is never seen half-written. On
  local disk it is written under a temporary name and renamed over the target (a rename is
  atomic); on an object store the object appears whole when its upload completes (a single PUT,
  or a completed multipart upload), and there is no rename to make.
* A remote model is copied once per node into a bounded cache (`local_copy`), not once per
  process into temporary folders that nobody removes.
* Credentials in a URI (`s3://KEY:SECRET@bucket/...`, `?secret_key=...`) never leave through
  `redact`: what is printed, logged or stored goes through it; the real URI only opens files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from skinray import UserError

HIDDEN = "***"
# `scheme://key:secret@` (the secret may hold '/') or `scheme://token@` (no '/' or ':'), before a host.
USERINFO = re.compile(r"""(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s'"@/]*:[^\s'"@]*|[^\s'"@/:]+)@""")
# URI query options that carry a secret (pyarrow's S3 and GCS options, and the usual spellings).
SECRET_QUERY = re.compile(
    r"""(?i)([?&](?:access_key|secret_key|session_token|access_token|token|password|"""
    r"""secret|credentials|key)=)[^&\s'"#]*"""
)


# === Locations ===


def is_uri(location: str) -> bool:
    """True for an object-store (or other non-local) URI; local paths and file:// are not."""
    return "://" in location and not location.startswith("file://")


def resolve(location: str) -> tuple[pafs.FileSystem, str, str]:
    """Returns (filesystem, path inside it, prefix that turns such a path back into a URI)."""
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/"), location.split("://", 1)[0] + "://"
    local = location.removeprefix("file://")
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve()), ""


def join_uri(base: str, name: str) -> str:
    """`base`/`name`, keeping a URI's query (s3://bucket/runs?endpoint_override=...) at the end."""
    location, sep, query = base.partition("?")
    return f"{location.rstrip('/')}/{name}{sep}{query}"


def basename(location: str) -> str:
    """The last name of a path or URI (`s3://b/runs/r50/?region=x` -> `r50`)."""
    return location.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def absolute(location: str) -> str:
    """A local path made absolute (other processes open it from their own working directories);
    URIs as they are."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def redact(text: str) -> str:
    """`text` (a URI, or a message holding URIs) with every credential replaced by ***.

    `s3://KEY:SECRET@bucket/x` -> `s3://***@bucket/x` (a secret may hold '/'); `...?region=r&secret_key=S`
    -> `...?region=r&secret_key=***`. Everything else, the text around a URI included, is left as it is.
    """
    if "://" not in text:
        return text
    text = USERINFO.sub(lambda m: m.group("scheme") + HIDDEN + "@", text)
    return SECRET_QUERY.sub(lambda m: m.group(1) + HIDDEN, text)


def _credentials_end(location: str) -> int:
    """Where `key:secret@` (a secret may hold '/') or a token@ with no '/' ends before the host; -1: none."""
    at = location.find("@")
    return at if at >= 0 and (":" in location[:at] or "/" not in location[:at]) else -1


def without_credentials(path: str) -> str:
    """`bucket/key` from `KEY:SECRET@bucket/key` (a path after a URI's scheme), as it is opened on
    a filesystem that already holds the credentials."""
    return path[_credentials_end(path) + 1 :]


# === Reading ===


def kind(location: str) -> str | None:
    """ "file", "dir", or None when nothing is there."""
    fs, path, _ = resolve(location)
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(fs.get_file_info(path).type)


def is_empty(location: str) -> bool:
    """True when nothing is there, or an empty folder."""
    fs, path, _ = resolve(location)
    found = fs.get_file_info(path).type
    return found == pafs.FileType.NotFound or (
        found == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(path))
    )


def list_files(location: str) -> tuple[pafs.FileSystem, str, str, list[str]]:
    """Every file below a folder, recursively: (filesystem, root, prefix, paths relative to root)."""
    fs, root, prefix = resolve(location)
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return (
        fs,
        root,
        prefix,
        [e.path[len(root) :].lstrip("/") for e in entries if e.type == pafs.FileType.File],
    )


def list_dirs(location: str) -> list[str]:
    """The names of the folders directly inside `location` (none when it does not exist)."""
    fs, path, _ = resolve(location)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return sorted(PurePosixPath(e.path).name for e in entries if e.type == pafs.FileType.Directory)


def read_bytes(fs: pafs.FileSystem, prefix: str, path: str) -> bytes:
    """Reads one file named by a full path or URI (a catalog's `path` column) on its filesystem."""
    with fs.open_input_file(path[len(prefix) :]) as f:
        return f.read()


def read_text(location: str) -> str | None:
    """The text of the file at `location`, or None when there is none."""
    fs, path, _ = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def read_json(location: str):
    """The JSON at `location`, or None when there is none."""
    text = read_text(location)
    return None if text is None else json.loads(text)


def read_marker(location: str) -> dict | None:
    """A stage's marker (`summary.json`, `report.json`, `check.json`, ...): None when there is none,
    and None with a warning when it cannot be read (a write cut short, a hand edit): the stage then
    counts as not finished and runs again, never a traceback."""
    try:
        marker = read_json(location)
    except (ValueError, UnicodeDecodeError):
        marker = "unreadable"
    if marker is None or isinstance(marker, dict):
        return marker
    from skinray.console import warn

    warn(f"{redact(location)} is unreadable (cut short, or edited): treating its step as not finished")
    return None


# === Writing ===


def write_bytes(location: str, data: bytes) -> None:
    """Writes a whole file at once, so that no reader ever sees part of it (see the module's doc)."""
    _write(location, lambda out: out.write(data))


def write_file(source: str | Path, location: str) -> None:
    """Copies a local file to `location` the same way (streamed: a model file is not held in memory)."""
    with open(source, "rb") as src:
        _write(location, lambda out: shutil.copyfileobj(src, out, 1 << 20))


def _write(location: str, fill) -> None:
    fs, path, _ = resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            fill(f)
        return
    temporary = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(temporary) as f:
            fill(f)
        fs.move(temporary, path)
    finally:
        if fs.get_file_info(temporary).type != pafs.FileType.NotFound:
            fs.delete_file(temporary)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def write_json(location: str, value) -> None:
    write_bytes(location, json.dumps(value, indent=2, default=str).encode())


def make_dir(location: str) -> None:
    fs, path, _ = resolve(location)
    fs.create_dir(path, recursive=True)


def clear_dir(location: str) -> None:
    """Removes a folder and everything in it; nothing happens when it does not exist."""
    fs, path, _ = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def upload_folder(folder: str | Path, location: str, last: tuple[str, ...] = ()) -> None:
    """Copies a local folder's files into `location`, each written whole (`write_file`); the files
    named in `last` (a step's marker) after all others, so that a marker never precedes its files."""
    folder = Path(folder)
    files = sorted(
        (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
        key=lambda name: (name in last, name),
    )
    make_dir(location)
    for name in files:
        write_file(folder / name, join_uri(location, name))


# === Locks: one writer per output ===

LOCK_TTL_S = 6 * 3600  # an object-store lock older than this is taken as abandoned


@contextlib.contextmanager
def lock(location: str, what: str):
    """Holds the lock file at `location` while the block runs; another holder is refused naming it.

    On local disk the file is created exclusively (O_EXCL), and a lock whose process died on this
    host is taken over. Object stores have no exclusive create: there the lock is best effort, an
    object with its owner, taken over after `LOCK_TTL_S`.
    """
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    fs, path, _ = resolve(location)
    local = isinstance(fs, pafs.LocalFileSystem)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    for _ in range(2):
        held = _live_owner(location, local)
        if held:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("since", 0)))
            raise UserError(
                f"{what} is being written by another run (pid {held.get('pid')} on {held.get('host')}, "
                f"since {since}): wait for it, or remove {redact(location)} if that run is gone"
            )
        if not local:
            write_json(location, owner)
            break
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # taken between our look and our create, or an abandoned lock we remove
            if _live_owner(location, local) is None:
                os.unlink(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
        break
    else:
        raise UserError(f"{what}: could not take the lock {redact(location)}")
    try:
        yield
    finally:
        if _owner(location) == owner:
            fs.delete_file(path)


def _owner(location: str) -> dict | None:
    """The lock's owner; None when there is no lock, or one cut short (its writer died mid-write)."""
    try:
        held = read_json(location)
    except ValueError:
        return None
    return held if isinstance(held, dict) else None


def _live_owner(location: str, local: bool) -> dict | None:
    held = _owner(location)
    if held is None or _stale(held) or (not local and time.time() - held.get("since", 0) > LOCK_TTL_S):
        return None
    return held


def _stale(held: dict) -> bool:
    """A lock whose process is gone: on this host, no process with its pid."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


# === Local copies of remote models: one cache per node ===

CACHE_ENV, CACHE_LIMIT_ENV = "SKINRAY_MODEL_CACHE", "SKINRAY_MODEL_CACHE_GB"
CACHE_LIMIT_GB = 20.0
CACHE_GRACE_S = 3600  # an entry used within the hour is kept: a process may be loading from it
COMPLETE = ".complete"


def local_copy(location: str) -> Path:
    """A local path of `location`: itself when local. A remote file or folder is copied once into
    the node's model cache ($SKINRAY_MODEL_CACHE, default ~/.cache/skinray/models), keyed by its
    path and its files' sizes and modification times, so every replica, actor and restart on the
    node reuses one copy, and a changed model is copied anew. Raises FileNotFoundError."""
    if not is_uri(location):
        local = Path(location.removeprefix("file://")).expanduser()
        if not local.exists():
            raise FileNotFoundError(location)
        return local
    fs, remote, _ = resolve(location)
    found = fs.get_file_info(remote)
    if found.type == pafs.FileType.NotFound:
        raise FileNotFoundError(location)
    files = (
        fs.get_file_info(pafs.FileSelector(remote, recursive=True))
        if found.type == pafs.FileType.Directory
        else [found]
    )
    signature = [fs.type_name, remote] + sorted(
        (f.path, f.size, f.mtime_ns) for f in files if f.type == pafs.FileType.File
    )
    key = hashlib.sha256(json.dumps(signature, default=str).encode()).hexdigest()[:24]
    cache = model_cache()
    entry = cache / key
    name = "content" if found.type == pafs.FileType.Directory else PurePosixPath(remote).name
    if (entry / COMPLETE).is_file():
        os.utime(entry / COMPLETE)  # the mark's time is when it was last used
        return entry / name
    partial = cache / f".partial-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        download(fs, remote, found.type == pafs.FileType.Directory, partial / name)
        (partial / COMPLETE).write_text(redact(location))
        try:
            os.rename(partial, entry)  # whole, or not at all; another process may have won the race
        except OSError:
            if not (entry / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    evict(cache, keep=entry)
    return entry / name


def download(fs: pafs.FileSystem, remote: str, folder: bool, target: Path) -> None:
    """Copies a remote file, or a folder with everything below it, to the local path `target`."""
    if folder:
        target.mkdir()
        pafs.copy_files(
            remote, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
    else:
        with fs.open_input_stream(remote) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)


def model_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "skinray" / "models").expanduser()


def evict(cache: Path, keep: Path | None = None) -> None:
    """Bounds the cache to $SKINRAY_MODEL_CACHE_GB (20): removes least recently used entries, and
    partial copies that dying processes left behind, but nothing used within `CACHE_GRACE_S`."""
    limit = float(os.environ.get(CACHE_LIMIT_ENV) or CACHE_LIMIT_GB) * 2**30
    now = time.time()
    entries = []
    for path in cache.iterdir():
        mark = path / COMPLETE
        used = mark.stat().st_mtime if mark.is_file() else path.stat().st_mtime
        if path.name.startswith(".partial-"):
            if now - used > CACHE_GRACE_S:
                shutil.rmtree(path, ignore_errors=True)
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        entries.append((used, size, path))
    total = sum(size for _, size, _ in entries)
    for used, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if path != keep and now - used > CACHE_GRACE_S:
            shutil.rmtree(path, ignore_errors=True)
            total -= size
