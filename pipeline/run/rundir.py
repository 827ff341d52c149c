"""The run directory's own files, beside the record store: the resolved config, the inputs'
digests, the invocations log and the driver's lock.

    config.yaml         the first invocation's resolved config (`write_config`), never rewritten
    inputs.yaml         what the inputs held when the run started (`write_inputs`; the digests
                        are taken by `jobs.preflight`)
    invocations.jsonl   one JSON line per invocation (`append_invocation`)
    driver.lock         locked by the running driver (`hold_run_dir`)
    run_dir_id          the directory's identity, a UUID written once (`run_identity`): what
                        MLflow finds the run by, whatever path the directory is mounted at

One driver at a time: the driver holds `hold_run_dir` for its whole run, so that a second
driver of the same run directory stops before it cleans up what the first is writing. The lock
is `flock`, which a shared file system may keep per host (NFS mounted with `local_lock`, FUSE
mounts of object stores such as gcsfuse and s3fs): there two drivers would both hold it, and
one's cleanup would delete the other's uncommitted shard. So the mount is looked up first
(`shared_mount`): a FUSE object store or an NFS mount with local locks is refused, any other
network file system (NFS, CIFS, ...) gets a warning (its locks are only as good as its lock
manager).

No secret is written here: every string of config.yaml and invocations.jsonl goes through
`redact` (a password in a URI's `user:password@`, a token in its query string), as do the
MLflow params (`pipeline.run.tracking`) and a submitted job's entrypoint (`jobs.submit`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from pipeline.config import Config

CONFIG_FILE = "config.yaml"
INPUTS_FILE = "inputs.yaml"
INVOCATIONS_FILE = "invocations.jsonl"
LOCK_FILE = "driver.lock"
IDENTITY_FILE = "run_dir_id"


REDACTED = "***"
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*):[^@/\s]*@")
_SECRET_QUERY = re.compile(
    r"(?P<head>[?&;](?:[\w.-]*token|[\w.-]*secret|password|passwd|pwd|api[_-]?key|key|sig|"
    r"signature|auth|credential|X-Amz-Signature|X-Amz-Credential)=)[^&;#\s]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the secrets a URI may carry replaced by `***`: the password of
    `scheme://user:password@host` (the user stays, to say which account) and the value of a
    query parameter that names a token, key, secret, password or signature."""
    text = _USERINFO.sub(rf"\g<head>:{REDACTED}@", text)
    return _SECRET_QUERY.sub(rf"\g<head>{REDACTED}", text)


def redacted(value: Any) -> Any:
    """`value` with `redact` applied to every string in it (dicts and lists walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redacted(v) for v in value]
    return value


class RunDirError(RuntimeError):
    """The run directory cannot be used: another driver holds it, or it cannot be created."""


def _tmp_name(path: Path) -> Path:
    """A hidden temporary name beside `path`, for a write that ends in `os.replace`."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def run_dir(cfg: Config) -> Path:
    """Where a run's records live: `<output_dir>/<run_id>`."""
    return Path(cfg.output_dir) / cfg.run_id


def run_identity(directory: Path | str, *, create: bool = False) -> str:
    """The run directory's identity: the UUID in `<directory>/run_dir_id`, written once (by
    `create`: `pipeline.run.tracking`, when it opens the directory's MLflow run) and never
    changed; "" if there is none yet and not `create`.
    Two directories at the same path on two hosts, or one directory gone and made again, have
    two identities; one directory mounted at two paths has one."""
    path = Path(directory) / IDENTITY_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if not create:
            return ""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(uuid.uuid4().hex + "\n")
        os.link(tmp, path)  # whole or not at all, and never over one already there
    except FileExistsError:
        pass
    except OSError:  # no hard links here (some FUSE mounts): an exclusive create instead
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, tmp.read_bytes())
            finally:
                os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def write_config(
    cfg: Config, directory: Path | None = None, *, keep_existing: bool = False
) -> Path:
    """Save the resolved config as `<run_dir>/config.yaml` (atomically, `redact`ed) and return
    its path.

    `keep_existing=True` leaves a config.yaml that is already there as it is (the driver keeps
    the first invocation's config; later ones go to `append_invocation`)."""
    target_dir = Path(directory) if directory is not None else run_dir(cfg)
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / CONFIG_FILE
    if keep_existing and path.exists():
        return path
    tmp = _tmp_name(path)
    try:
        tmp.write_text(yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def append_invocation(directory: Path | str, entry: dict) -> Path:
    """Append `entry` as one JSON line to `<run_dir>/invocations.jsonl` and return its path.

    One `write` of one line to a file opened for appending, then fsync: a crash leaves at most
    a torn last line, which `read_invocations` skips (the next entry starts on a new line);
    earlier lines are never rewritten. Its strings are `redact`ed."""
    path = Path(directory) / INVOCATIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(redacted(entry), sort_keys=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # after a torn line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_invocations(directory: Path | str) -> list[dict]:
    """The entries of `<run_dir>/invocations.jsonl`, oldest first (a torn line is skipped)."""
    path = Path(directory) / INVOCATIONS_FILE
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def write_inputs(directory: Path | str, inputs: dict[str, dict[str, str]]) -> Path:
    """Save `inputs` (input name -> what its content was, `jobs.preflight.input_digests`) as
    `<run_dir>/inputs.yaml`, atomically, unless the file is there already (the first
    invocation's inputs are what a resume is compared with)."""
    path = Path(directory) / INPUTS_FILE
    if path.exists():
        return path
    tmp = _tmp_name(path)
    try:
        tmp.write_text(yaml.safe_dump(inputs, sort_keys=False))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_inputs(directory: Path | str) -> dict[str, dict[str, str]] | None:
    """The inputs recorded by `write_inputs`, or None (a run from before inputs.yaml existed)."""
    path = Path(directory) / INPUTS_FILE
    if not path.exists():
        return None
    return yaml.safe_load(path.read_text()) or {}


# File systems whose `flock` other hosts may not see: refused where it is known to be local.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs")
OBJECT_STORE_FS = ("fuse.gcsfuse", "fuse.s3fs", "fuse.goofys", "fuse.rclone", "fuse.mountpoint-s3",
                   "fuse.blobfuse", "fuse.blobfuse2", "fuse.juicefs")  # fmt: skip
logger = logging.getLogger(__name__)


def shared_mount(directory: Path | str, mounts: str | None = None) -> tuple[str, str, str]:
    """(mount point, file system type, options) of the mount that holds `directory`, read from
    /proc/mounts (or the text `mounts`); ("", "", "") where it cannot be read (not Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "", "", ""
    path = os.path.realpath(directory)
    best = ("", "", "")
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ").replace("\\011", "\t")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2], fields[3])
    return best


def check_mount(directory: Path | str, mounts: str | None = None) -> None:
    """Refuse a run directory whose `flock` is known not to reach other hosts (a FUSE object
    store; NFS with `local_lock=all|flock`); warn on another network file system."""
    point, fstype, options = shared_mount(directory, mounts)
    local_lock = any(o in ("local_lock=all", "local_lock=flock") for o in options.split(","))
    where = f"{directory} is on {fstype} ({point})"
    if fstype in OBJECT_STORE_FS or (fstype.startswith("nfs") and local_lock):
        raise RunDirError(
            f"{where}, where the driver's lock (flock) is not seen by other hosts and files "
            "cannot be renamed atomically everywhere: two drivers could both run it. Put "
            "output_dir on a local disk or on NFS with working locks (docs/cluster.md)"
        )
    if fstype in NETWORK_FS:
        logger.warning(
            "%s: the driver's lock holds only if its lock manager works across hosts; run one "
            "driver per run_id (docs/cluster.md)", where,
        )  # fmt: skip


@contextlib.contextmanager
def hold_run_dir(directory: Path | str) -> Iterator[Path]:
    """Hold an exclusive lock on the run directory (created if needed) for the block.

    The lock is the kernel's (`fcntl.flock` on `<directory>/driver.lock`, kept open): it is
    released when the holder's process ends, however it ends, so a SIGKILLed driver never leaves
    a stale lock; the file stays and means nothing unless locked. The holder writes its pid and
    host into the file, and a second driver's `RunDirError` names them. The descriptor is not
    inherited across exec (Python's default), so processes the driver starts (Ray's) never hold
    it. Raises RunDirError at once if another process holds the lock (it does not wait), or if
    the directory is on a mount where the lock would not hold (`check_mount`)."""
    directory = Path(directory)
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        check_mount(directory)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"cannot create the run directory {directory}: {exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirError(
                f"{directory} is in use by another driver ({_holder(fd)}); wait for it to end, "
                "or use another run_id (run_id=<new>)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int, wait_s: float = 1.0) -> str:
    """What the lock's holder wrote ("pid N on HOST"), waiting up to `wait_s` for a holder that
    has locked but not yet written."""
    deadline = time.monotonic() + wait_s
    while True:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text or time.monotonic() > deadline:
            return text or "pid and host not written"
        time.sleep(0.05)
