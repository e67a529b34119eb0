"""Storage addressed by URI: ``s3://bucket/prefix`` or a local path.

Reads for Ray Data go through :func:`filesystem` (``pyarrow.fs``); listing, writing and deleting go
through boto3 for S3.  S3-compatible endpoints and credentials come only from the standard AWS
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, instance
profiles ...), never from a config file.  Both clients retry throttling (503 SlowDown) and 5xx
errors with exponential backoff.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import logging
import os
import posixpath
import random
import shutil
import stat as stat_mod
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

S3_MAX_ATTEMPTS = int(os.environ.get("MPLUG2_S3_MAX_ATTEMPTS", "10"))
S3_READ_TIMEOUT_S = float(os.environ.get("MPLUG2_S3_READ_TIMEOUT_S", "60"))  # per request, then retried
S3_READ_CHUNK = 8 << 20  # bytes per ranged GET when an object is read as a stream (open_input)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def has_scheme(uri: str) -> bool:
    return "://" in str(uri)


def join(base: str, *parts: str) -> str:
    """Join path segments onto a URI or local path."""
    out = str(base)
    for p in parts:
        p = str(p)
        if not p:
            continue
        out = out.rstrip("/") + "/" + p.lstrip("/") if (has_scheme(out) or out) else p
    return out


def resolve(root: str, path: str) -> str:
    """A path relative to ``root`` unless it is already absolute (a URI or an absolute local path)."""
    path = str(path)
    if has_scheme(path) or os.path.isabs(path):
        return path
    return join(root, path)


class UnsafeKey(ValueError):
    """An object key that would name a file outside the folder it is being copied into."""


def safe_destination(local_dir: str | os.PathLike, rel: str) -> Path:
    """``local_dir / rel`` for a key-derived relative name, refusing any that leaves ``local_dir``:
    absolute names, ``..`` segments, empty segments (``a//b``), backslashes and NUL."""
    parts = rel.split("/")
    if (not rel or "\\" in rel or "\0" in rel or rel.startswith("/")
            or any(p in ("", ".", "..") for p in parts)):
        raise UnsafeKey(f"refusing object key {rel!r}: it would be written outside {local_dir}")
    root = Path(local_dir).resolve()
    dst = (root / rel).resolve()
    if dst == root or root not in dst.parents:
        raise UnsafeKey(f"refusing object key {rel!r}: it resolves to {dst}, outside {root}")
    return dst


def local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return os.path.abspath(uri)


def normalized(uri: str) -> str:
    """``uri`` with ``.``/``..`` segments and repeated slashes resolved, for comparing locations:
    ``s3://bucket/key`` or an absolute local path.  ValueError for a URI that names no object
    (``s3:///x``, a key climbing above its bucket), a scheme this project does not read, or a NUL."""
    uri = str(uri)
    if "\0" in uri:
        raise ValueError(f"{uri!r} holds a NUL byte")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        key = posixpath.normpath("/" + key).lstrip("/") if key else ""
        if ".." in key.split("/") or "/" in bucket:
            raise ValueError(f"{uri!r} climbs above its bucket")
        return f"s3://{bucket}/{key}".rstrip("/") if key else f"s3://{bucket}"
    if has_scheme(uri) and not uri.startswith("file://"):
        raise ValueError(f"{uri!r}: only s3:// URIs and local paths are read")
    return os.path.normpath(local_path(uri))


def is_within(uri: str, folder: str) -> bool:
    """Whether ``uri`` is ``folder`` or lies under it, after :func:`normalized` (segment-wise: ``s3://b/v``
    does not contain ``s3://b/v2/x``).  False for anything :func:`normalized` refuses."""
    try:
        u, f = normalized(uri), normalized(folder)
    except ValueError:
        return False
    return u == f or u.startswith(f.rstrip("/") + "/")


class NotARegularFile(OSError):
    """A local path that is a FIFO, a device, a socket or a folder: reading it could block forever or
    never end, so it is refused before any byte is read."""


def open_regular(path: str | os.PathLike):
    """A binary file object for ``path`` when it is a regular file (symlinks to one are followed);
    :class:`NotARegularFile` otherwise.  Opened non-blocking first, so a FIFO without a writer is
    refused at once instead of blocking the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat_mod.S_ISREG(mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file (a FIFO, device, socket or folder)", str(path))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def open_input(uri: str, buffer_size: int = S3_READ_CHUNK):
    """A readable binary stream of one object: :class:`S3Object` behind a buffer of ``buffer_size``
    bytes (one ranged GET per buffer, a body that breaks off read again from where it stopped;
    smaller, a capped read reads no more than its cap), or :func:`open_regular` for a local path."""
    if is_s3(uri):
        fs, path = filesystem(uri)
        return io.BufferedReader(S3Object(fs, path, uri), buffer_size=max(1, min(buffer_size, S3_READ_CHUNK)))
    return open_regular(local_path(uri))


class CutShort(OSError):
    """A read returned fewer bytes than the object had when it was opened."""


def is_missing(error: BaseException) -> bool:
    """The storage said the object is not there (pyarrow and boto3 say it in words)."""
    text = str(error)
    return isinstance(error, FileNotFoundError) or not isinstance(error, CutShort) and any(
        m in text for m in ("does not exist", "NoSuchKey", "NO_SUCH_KEY", "Not Found", "404"))


def _refused(error: OSError) -> bool:
    """An answer no retry changes: not there, or access denied."""
    return is_missing(error) or isinstance(error, PermissionError) or any(
        m in str(error) for m in ("AccessDenied", "ACCESS_DENIED"))


def _backoff(attempt: int) -> float:
    """Full-jitter exponential backoff before retry ``attempt`` (1, 2, ...), at most 20 s."""
    return min(20.0, random.random() * 2 ** attempt * 0.1)


class S3Object(io.RawIOBase):
    """One S3 object read front to back through pyarrow's S3 client, each read one ranged GET.

    pyarrow's retry strategy retries a request that fails, not a response body that breaks off
    mid-way (a connection reset or a truncated body: curl error 56, "Failed to flush response
    stream"): a clip read so was counted bad, a checkpoint restore failed its run.  Here such a read
    is asked again from the same offset, after a backoff, up to :data:`S3_MAX_ATTEMPTS` failures in
    a row; a GET that returns fewer bytes than the size the object had when opened counts as one.
    pyarrow's input files read exactly what they are asked (a tar read 10 KiB at a time was one GET
    per 10 KiB): :func:`open_input` puts a buffer of :data:`S3_READ_CHUNK` in front, and a single
    read here asks for at most that much.  An object not there (or refused) fails at once."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.pos = 0
        self.file = self._retrying(fs.open_input_file, path)  # a HEAD: the size
        self.size = self.file.size()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos, S3_READ_CHUNK)
        if n <= 0:
            return 0
        data = self._retrying(self._read_exactly, n)
        b[:n] = data
        self.pos += n
        return n

    def readall(self) -> bytes:
        parts = []
        while self.pos < self.size:
            n = min(self.size - self.pos, S3_READ_CHUNK)
            parts.append(self._retrying(self._read_exactly, n))
            self.pos += n
        return b"".join(parts)

    def close(self) -> None:
        if not self.closed and getattr(self, "file", None) is not None:
            self.file.close()
        super().close()

    def _read_exactly(self, n: int) -> bytes:
        data = self.file.read_at(n, self.pos)
        if len(data) != n:
            raise CutShort(f"{self.uri}: {len(data)} bytes at offset {self.pos} where the object had {n} more "
                          "(changed or cut short)")
        return data

    def _retrying(self, call, *args):
        for attempt in range(1, S3_MAX_ATTEMPTS + 1):
            try:
                return call(*args)
            except OSError as e:
                if _refused(e) or attempt == S3_MAX_ATTEMPTS:
                    raise
                log.debug("reading %s at offset %d failed (%s); retry %d", self.uri, self.pos, e, attempt)
                time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")


def regular_files(local_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """``[(file, relative name)]`` of the regular files inside ``local_dir``, sorted.  A symlink is
    followed only when its target lies inside ``local_dir`` too; one that leads outside (a file
    elsewhere on the machine, ``/etc/passwd``, another user's data) and anything that is not a
    regular file is left out with a warning, so copying a folder never copies foreign content."""
    root = Path(local_dir)
    real_root = root.resolve()
    out = []
    for f in sorted(root.rglob("*")):
        if f.is_dir() and not f.is_symlink():
            continue
        real = f.resolve()
        if real != real_root and real_root not in real.parents:
            log.warning("not copying %s: a symlink to %s, outside %s", f, real, root)
            continue
        if f.is_dir():
            continue  # a symlinked folder inside the tree: its files are listed under their own path
        if not real.is_file():
            log.warning("not copying %s: not a regular file", f)
            continue
        out.append((f, f.relative_to(root).as_posix()))
    return out


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------

def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@functools.lru_cache(maxsize=8)
def _s3_client_cached(endpoint: str | None, region: str, max_attempts: int, read_timeout: float = 60.0):
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=10,
        read_timeout=read_timeout,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def s3_client():
    """A boto3 S3 client for the current AWS environment (cached per endpoint)."""
    return _s3_client_cached(_endpoint(), _region(), S3_MAX_ATTEMPTS, S3_READ_TIMEOUT_S)


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for the current AWS environment (cached per endpoint and region)."""
    return _s3_filesystem_cached(_endpoint(), _region(), S3_MAX_ATTEMPTS, S3_READ_TIMEOUT_S)


@functools.lru_cache(maxsize=8)
def _s3_filesystem_cached(endpoint: str | None, region: str, max_attempts: int,
                          request_timeout: float = 60.0) -> pafs.S3FileSystem:
    return RetryingS3FileSystem(endpoint, region, max_attempts, request_timeout)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with our retries and timeouts, also after pickling.

    pyarrow's own ``S3FileSystem`` leaves ``retry_strategy`` and ``connect_timeout`` out of what it
    pickles (pyarrow 25), so in the processes it is shipped to (Ray Train's controller writing its
    checkpoint registry, the workers uploading checkpoints, Ray Data's read tasks) it retried 3
    times, not ``S3_MAX_ATTEMPTS``: one S3 blip of 3 failures in a row ended a whole run. This one
    pickles its settings and is rebuilt from them."""

    def __init__(self, endpoint: str | None, region: str, max_attempts: int, request_timeout: float = 60.0):
        kwargs = dict(
            region=region,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
            connect_timeout=10,
            request_timeout=request_timeout,
        )
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host or endpoint, scheme=scheme if host else "https")
            kwargs["force_virtual_addressing"] = False
        super().__init__(**kwargs)
        self.settings = (endpoint, region, max_attempts, request_timeout)

    def __reduce__(self):
        return RetryingS3FileSystem, self.settings


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), local_path(uri)


# ---------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------

class TooLarge(ValueError):
    """An object larger than the cap its reader was given."""


def read_bytes(uri: str, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """The whole object; with ``max_bytes``, one larger than that raises :class:`TooLarge` after
    reading at most ``max_bytes + 1`` bytes of it (the size is not taken on trust from metadata);
    with ``timeout_s``, a read that takes longer raises :class:`TimeoutError` (a server dripping
    bytes keeps each request under its own timeout, not the whole read)."""
    if timeout_s is not None:
        return _within(timeout_s, uri, read_bytes, uri, max_bytes)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        data = _get_object_body(bucket, key, max_bytes)
    else:
        with open_regular(local_path(uri)) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"{uri} is larger than {max_bytes} bytes")
    return data


def _within(timeout_s: float, uri: str, fn, *args):
    """``fn(*args)`` in a daemon thread, abandoned after ``timeout_s`` (TimeoutError)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # re-raised in the caller's thread
            box["err"] = e

    t = threading.Thread(target=target, daemon=True, name=f"read:{uri[-40:]}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"reading {uri} took longer than {timeout_s:g} s")
    if "err" in box:
        raise box["err"]
    return box["out"]


def _get_object_body(bucket: str, key: str, max_bytes: int | None = None) -> bytes:
    """GetObject and read its body.  botocore retries the request but not a body that breaks off
    mid-stream (connection reset, truncated response, read timeout): retry those here too, with
    the same attempt budget and exponential backoff; the last error is raised."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import (
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    for attempt in range(1, S3_MAX_ATTEMPTS + 1):
        try:
            resp = s3_client().get_object(Bucket=bucket, Key=key)
            if max_bytes is not None and resp.get("ContentLength", 0) > max_bytes:
                resp["Body"].close()  # not read: its ContentLength already says it is too large
                raise TooLarge(f"s3://{bucket}/{key} is {resp['ContentLength']} bytes, larger than {max_bytes}")
            return resp["Body"].read() if max_bytes is None else _read_capped(resp["Body"], max_bytes)
        except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, BotoConnectionError):
            if attempt == S3_MAX_ATTEMPTS:
                raise
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def _read_capped(body, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of a botocore body; reading on to the empty chunk lets
    botocore check the length (a body cut short raises IncompleteReadError, retried above)."""
    out = bytearray()
    while len(out) <= max_bytes:
        chunk = body.read(max_bytes + 1 - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    p = Path(local_path(uri))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")  # unique per writer, threads of one process too
    tmp.write_bytes(data)
    os.replace(tmp, p)  # atomic: a reader never sees half a file


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return os.path.exists(local_path(uri))


def list_files(prefix: str) -> Iterator[str]:
    """Every object/file under ``prefix`` (recursively), as URIs, in key order.  Paginated on S3."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}"
        return
    root = Path(local_path(prefix))
    if root.is_file():
        yield str(root)
        return
    for p in sorted(root.rglob("*")):
        if p.is_file():
            yield str(p)


def delete_prefix(prefix: str) -> int:
    """Delete everything under ``prefix``; returns how many objects/files went."""
    if is_s3(prefix):
        bucket, _ = split_s3(prefix)
        client = s3_client()
        keys = [split_s3(u)[1] for u in list_files(prefix)]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        return len(keys)
    p = Path(local_path(prefix))
    if not p.exists():
        return 0
    n = sum(1 for q in p.rglob("*") if q.is_file()) if p.is_dir() else 1
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    return n


def upload_dir(local_dir: str | os.PathLike, uri: str) -> int:
    """Copy a local directory tree to ``uri``; returns the number of files."""
    n = 0
    for f, rel in regular_files(local_dir):  # no symlink out of the folder, no FIFO
        if is_s3(uri):
            bucket, key = split_s3(join(uri, rel))
            s3_client().upload_file(str(f), bucket, key)
        else:
            dst = Path(local_path(join(uri, rel)))
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        n += 1
    return n


def download_dir(uri: str, local_dir: str | os.PathLike) -> int:
    """Copy everything under ``uri`` into ``local_dir``; returns the number of files.

    Object keys are untrusted: a key whose remainder after the prefix would name a file outside
    ``local_dir`` (``..`` segments, ``//``, an absolute name, a symlinked folder) raises
    :class:`UnsafeKey` before anything is written; nothing is followed or overwritten outside.  From a
    local folder only its regular files are copied (:func:`regular_files`): a symlink inside it that
    leads elsewhere is left out, so its target's content is never copied (into MLflow, a checkpoint).
    Keys ending in ``/`` are folder markers (what ``pyarrow.fs`` leaves in a checkpoint it uploads) and
    are skipped."""
    local_dir = Path(local_dir)
    base = uri.rstrip("/") + "/"
    plan = []
    if is_s3(uri):
        for src in list_files(uri):
            if src.endswith("/"):
                continue  # a folder marker (pyarrow writes them, e.g. into every Ray Train checkpoint): not a file
            plan.append((src, safe_destination(local_dir, src[len(base):])))
    elif os.path.isfile(local_path(uri)):
        plan.append((local_path(uri), safe_destination(local_dir, os.path.basename(local_path(uri)))))
    else:  # a local folder: its regular files only (a symlink out of it is not followed)
        plan = [(str(f), safe_destination(local_dir, rel)) for f, rel in regular_files(local_path(uri))]
    n = 0
    for src, dst in plan:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if is_s3(src):
            bucket, key = split_s3(src)
            s3_client().download_file(bucket, key, str(dst))
        else:
            shutil.copyfile(src, dst)
        n += 1
    return n


@contextlib.contextmanager
def local_folder(uri: str, cache_root: str | os.PathLike | None = None) -> Iterator[str]:
    """A local folder holding the files under ``uri``, read-only for the caller: the folder itself
    when it is local, else a download shared by the processes of this machine (the ranks of a node
    resuming from one checkpoint download it once) and removed when the last of them is done.

    The download is :func:`download_dir` (boto3 retries a request and reads a body that breaks off
    mid-way again; pyarrow's ``copy_files``, which Ray's ``Checkpoint.as_directory`` uses, retries
    neither a body cut short: a restore through S3 faults failed its run so, and Ray's processes that
    waited for another's download went on with whatever it left).  A download is named by the
    endpoint, ``uri`` and a fresh listing of it (every key's size and ETag): a checkpoint name
    written again by a later attempt is another download.  One process downloads at a time, under
    an exclusive lock, and marks it complete last; a process that finds no mark downloads again, so
    one that failed part-way leaves nothing the others use.  Each user holds a shared lock while it
    reads; the last to leave removes the folder, and a folder left by a killed process is removed by
    a later call once no one holds it.  The shared folder lives in a directory private to this user
    (``<tmp>/mplug2-downloads-<uid>``, mode 0700); when that cannot be had, each call downloads into
    its own temporary folder."""
    if not is_s3(uri):
        yield local_path(uri)
        return
    import hashlib
    import json

    root = Path(cache_root or tempfile.gettempdir(), f"mplug2-downloads-{os.getuid()}")
    if not _private_dir(root):
        log.warning("%s is not a folder private to this user: downloading %s into a folder of its own", root, uri)
        with tempfile.TemporaryDirectory(prefix="mplug2-download-") as d:
            download_dir(uri, d)
            yield d
        return
    listing = json.dumps(_listing(uri), sort_keys=True)
    base = root / hashlib.sha256(f"{_endpoint()}|{normalized(uri)}|{listing}".encode()).hexdigest()[:32]
    _sweep(root, keep=base.name)
    folder, done = base.with_suffix(".d"), base.with_suffix(".complete")
    with open(base.with_suffix(".lock"), "a+b") as lock, open(base.with_suffix(".users"), "a+b") as users:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)  # a download that failed part-way
                download_dir(uri, folder)
                folder.mkdir(exist_ok=True)
                done.touch()
            fcntl.flock(users, fcntl.LOCK_SH)  # taken under the lock: no one removes the folder now
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        try:
            yield str(folder)
        finally:
            fcntl.flock(users, fcntl.LOCK_UN)
            _remove_unused(base, lock, users)


def _private_dir(root: Path) -> bool:
    """``root`` exists (made here if not) as a real folder of this user that no one else can write."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(root)
    except OSError:
        return False
    return stat_mod.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _listing(uri: str) -> dict[str, list]:
    """{key: [size, ETag]} of every object under ``uri`` (one paginated listing)."""
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    out = {}
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = [obj["Size"], obj.get("ETag", "")]
    return out


def _remove_unused(base: Path, lock, users) -> bool:
    """Remove ``base``'s download when no process uses it (``lock`` and ``users``: its open lock
    files); True when removed.  The two empty lock files stay: a process may hold one open, waiting,
    and a new file of the same name would let a second process in beside it."""
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # another process reads it
        base.with_suffix(".complete").unlink(missing_ok=True)
        shutil.rmtree(base.with_suffix(".d"), ignore_errors=True)
        fcntl.flock(users, fcntl.LOCK_UN)
        return True
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


def _sweep(root: Path, keep: str) -> None:
    """Remove the downloads under ``root`` that no process uses (a killed process leaves its own),
    but ``keep``; a download in progress or in use is left alone."""
    for folder in root.glob("*.d"):
        base = folder.with_suffix("")
        if base.name == keep:
            continue
        try:
            with open(base.with_suffix(".lock"), "a+b") as lock, open(base.with_suffix(".users"), "a+b") as users:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not while another downloads it
                except BlockingIOError:
                    continue
                fcntl.flock(lock, fcntl.LOCK_UN)
                _remove_unused(base, lock, users)
        except OSError as e:  # another user's files, a full disk: never fails a restore
            log.warning("could not clean up download %s: %s", folder, e)


def checkpoint_uri(checkpoint) -> str | None:
    """The URI of a Ray ``Checkpoint`` (its ``path`` in its storage ``filesystem``): ``s3://`` on an
    S3 filesystem, the path itself otherwise; None for None."""
    if checkpoint is None:
        return None
    return f"s3://{checkpoint.path}" if isinstance(checkpoint.filesystem, pafs.S3FileSystem) else checkpoint.path


def stat(uri: str) -> dict[str, Any]:
    """``{"size", "etag" | "mtime"}`` of one object/file (no body read)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        head = s3_client().head_object(Bucket=bucket, Key=key)
        return {"size": head["ContentLength"], "etag": head.get("ETag", "").strip('"')}
    st = os.stat(local_path(uri))
    return {"size": st.st_size, "mtime": st.st_mtime_ns}


def for_ray(uri: str):
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig`` / ``ray.tune.RunConfig``."""
    if is_s3(uri):
        fs, path = filesystem(uri)
        return path, fs
    return local_path(uri), None


class AlreadyExists(FileExistsError):
    """:func:`create_exclusive` found the object already there."""


def create_exclusive(uri: str, data: bytes) -> None:
    """Write ``uri`` only if nothing is there yet, atomically: S3's conditional put
    (``If-None-Match: *``), ``O_CREAT | O_EXCL`` locally.  Raises :class:`AlreadyExists` otherwise;
    of two writers racing for the same name exactly one succeeds."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise AlreadyExists(uri) from None
            raise
        return
    p = Path(local_path(uri))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")  # unique per writer, threads of one process too
    tmp.write_bytes(data)
    try:
        os.link(tmp, p)  # atomic and exclusive (as O_EXCL), and a reader never sees half a file
    except FileExistsError:
        raise AlreadyExists(uri) from None
    finally:
        tmp.unlink(missing_ok=True)


def list_sizes(prefix: str) -> dict[str, int]:
    """``{uri: size in bytes}`` of every object/file under ``prefix`` (one listing, no body read)."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out = {}
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                out[f"s3://{bucket}/{obj['Key']}"] = int(obj["Size"])
        return out
    return {u: os.path.getsize(u) for u in list_files(prefix)}
