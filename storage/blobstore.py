"""Blob stores: where the Part 10 bytes live (filesystem or S3), behind one small interface.

Objects are stored exactly as received and addressed by their SHA-256, so identical bytes are stored once and a
different object under the same SOP Instance UID never overwrites the first.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, urlparse


class BlobStoreError(Exception):
    """The blob store could not complete an operation (disk full, S3 unreachable, ...)."""


def blob_key_for(sha256: str) -> str:
    """256 folders: few enough that each is created (and its creation fsynced) once, early."""
    return f"{sha256[:2]}/{sha256}.dcm"


class BlobStore(Protocol):
    url: str

    def put_file(self, key: str, path: Path, size: int, *, adopt: bool = False) -> None:
        """Store the file at `path` under `key`, durably, before returning.

        With `adopt` the store may move the file instead of copying it (the caller gives it up).
        """

    def open(self, key: str) -> BinaryIO: ...

    @contextlib.contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        """A local path holding the object, valid inside the context (downloaded when remote)."""
        yield Path()

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def iter_keys(self) -> Iterator[str]: ...

    def check(self) -> None:
        """Raise BlobStoreError when the store cannot be reached or written."""


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


def _page_in(mapped: mmap.mmap) -> None:
    """Fault a map's pages in now (Linux 5.14+), so that sending it never waits on the disk; else ask for
    read-ahead."""
    if _MADV_POPULATE_READ is not None:
        try:
            mapped.madvise(_MADV_POPULATE_READ)
            return
        except OSError:
            pass
    with contextlib.suppress(OSError, AttributeError):
        mapped.madvise(mmap.MADV_WILLNEED)


class FileBlobStore:
    """Blobs as files: temp file, fsync, atomic rename, fsync of the directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = self.root.as_uri()
        self.tmp_dir = self.root / ".tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[str] = set()
        self._root = os.fspath(self.root)
        self._tmp = os.fspath(self.tmp_dir)
        self._lock = threading.Lock()

    def path_for(self, key: str) -> Path:
        return self.root / key

    def _ensure_dir(self, name: str) -> None:
        if name in self._known_dirs:
            return
        directory = Path(name)
        with self._lock:
            missing = []
            d = directory
            while not d.exists():
                missing.append(d)
                d = d.parent
            directory.mkdir(parents=True, exist_ok=True)
            # A new directory entry is only durable once its parent is synced.
            for created in reversed(missing):
                _fsync_dir(created.parent)
            self._known_dirs.add(name)

    def put_file(self, key: str, path: Path, size: int, *, adopt: bool = False) -> None:
        # Plain strings from here on: this runs for every object received, and pathlib's objects cost more than
        # the system calls they make.
        target = os.path.join(self._root, key)
        directory = os.path.dirname(target)
        try:
            self._ensure_dir(directory)
            try:
                existing = os.stat(target).st_size
            except FileNotFoundError:
                existing = None
            if existing == size:
                # Content-addressed: the same key means the same bytes. Another writer may not have synced them
                # yet (it died between its rename and its fsync): sync them before this object is acknowledged.
                fd = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if adopt:
                    path.unlink(missing_ok=True)
                return
            staged = os.fspath(path)
            if not (adopt and os.path.dirname(staged) == self._tmp):
                fd, staged = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
                with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            # Rename first, then fsync the file: one journal commit makes both the bytes and the new name durable
            # (ext4, XFS), and the directory fsync that POSIX asks for then finds nothing left to write. Until
            # that fsync returns the object is not acknowledged; a crash in between leaves an unreferenced blob
            # that the ingest journal removes at the next start.
            fd = os.open(staged, os.O_RDONLY)
            try:
                os.replace(staged, target)
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(directory)
        except OSError as exc:
            raise BlobStoreError(f"cannot write {key}: {exc.strerror or exc}") from exc

    def map_range(self, key: str, offset: int, length: int, size: int) -> memoryview:
        """Bytes [offset, offset + length) of the object, `size` bytes in all, as a read-only memory map already
        paged in: a server can hand them to a socket without copying them through its own buffers.

        Call it outside an event loop (paging in may read the disk). The map lives as long as the view.
        """
        try:
            with open(self.path_for(key), "rb") as fp:
                # Checked first: touching a map beyond the end of a shorter file would kill the process (SIGBUS).
                if os.fstat(fp.fileno()).st_size != size:
                    raise BlobStoreError(f"{key} is not {size} bytes long")
                mapped = mmap.mmap(fp.fileno(), length, access=mmap.ACCESS_READ, offset=offset)
        except (OSError, ValueError) as exc:
            raise BlobStoreError(f"cannot read {key}: {getattr(exc, 'strerror', None) or exc}") from exc
        _page_in(mapped)
        return memoryview(mapped)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path_for(key), "rb")
        except OSError as exc:
            raise BlobStoreError(f"cannot read {key}: {exc.strerror or exc}") from exc

    @contextlib.contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        path = self.path_for(key)
        if not path.exists():
            raise BlobStoreError(f"missing blob {key}")
        yield path

    def exists(self, key: str) -> bool:
        return self.path_for(key).exists()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path_for(key).unlink()

    def iter_keys(self) -> Iterator[str]:
        for path in self.root.rglob("*.dcm"):
            rel = path.relative_to(self.root)
            if rel.parts[0] == ".tmp":
                continue
            yield rel.as_posix()

    def check(self) -> None:
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.tmp_dir, prefix="health-"):
                pass
        except OSError as exc:
            raise BlobStoreError(f"blob directory not writable: {exc}") from exc


class S3BlobStore:
    """Blobs in an S3 bucket through the minio client, with bounded retries and a connection pool.

    Each association thread writes its own objects, so writes from parallel associations run in parallel.
    """

    PART_SIZE = 16 * 1024 * 1024

    def __init__(self, url: str, access_key: str, secret_key: str, *, tmp_dir: Path) -> None:
        import urllib3
        from minio import Minio

        parsed = urlparse(url)
        params = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        self.bucket = parsed.netloc
        if not self.bucket:
            raise ValueError(f"no bucket in storage URL {url!r}")
        endpoint = params.get("endpoint", "127.0.0.1:9000")
        secure = params.get("secure", "false").lower() in ("1", "true", "yes")
        self.prefix = parsed.path.strip("/")
        self.url = url
        self.tmp_dir = tmp_dir
        tmp_dir.mkdir(parents=True, exist_ok=True)
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3.0, read=60.0),
            maxsize=32,
            retries=urllib3.Retry(
                total=2, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504], allowed_methods=None
            ),
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=params.get("region", "us-east-1"),
            http_client=http,
        )
        self._bucket_ready = False

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        if not self.client.bucket_exists(self.bucket):
            with contextlib.suppress(Exception):
                self.client.make_bucket(self.bucket)
            if not self.client.bucket_exists(self.bucket):
                raise BlobStoreError(f"cannot create bucket {self.bucket}")
        self._bucket_ready = True

    def _call(self, what: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Run one S3 call with a few retries on top of urllib3's, so a short blip is not a failure."""
        delay = 0.1
        for attempt in range(3):
            try:
                self._ensure_bucket()
                return fn(*args, **kwargs)
            except BlobStoreError:
                raise
            except Exception as exc:  # minio raises S3Error, urllib3 errors, OSError
                code = getattr(exc, "code", None)
                if code in ("NoSuchKey", "NoSuchBucket") or attempt == 2:
                    raise BlobStoreError(f"S3 {what} failed: {exc}") from exc
                time.sleep(delay)
                delay *= 3
        raise AssertionError("unreachable")

    def put_file(self, key: str, path: Path, size: int, *, adopt: bool = False) -> None:
        self._call(
            f"put {key}",
            self.client.fput_object,
            self.bucket,
            self._name(key),
            str(path),
            content_type="application/dicom",
            part_size=self.PART_SIZE,
        )

    def open(self, key: str) -> BinaryIO:
        response = self._call(f"get {key}", self.client.get_object, self.bucket, self._name(key))
        return _ResponseReader(response)  # type: ignore[return-value]

    @contextlib.contextmanager
    def local_file(self, key: str) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".dcm")
        os.close(fd)
        try:
            self._call(f"get {key}", self.client.fget_object, self.bucket, self._name(key), name)
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def exists(self, key: str) -> bool:
        try:
            self._call(f"stat {key}", self.client.stat_object, self.bucket, self._name(key))
            return True
        except BlobStoreError as exc:
            if "NoSuchKey" in str(exc) or "Not Found" in str(exc) or "does not exist" in str(exc):
                return False
            raise

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self.client.remove_object, self.bucket, self._name(key))

    def iter_keys(self) -> Iterator[str]:
        prefix = f"{self.prefix}/" if self.prefix else None
        objects = self._call("list", self.client.list_objects, self.bucket, prefix=prefix, recursive=True)
        for obj in objects:
            name = obj.object_name or ""
            yield name[len(prefix) :] if prefix else name

    def check(self) -> None:
        self._bucket_ready = False
        self._call("health check", self.client.bucket_exists, self.bucket)


class _ResponseReader:
    """File-like wrapper that releases the urllib3 connection when closed."""

    def __init__(self, response) -> None:  # type: ignore[no-untyped-def]
        self._response = response

    def read(self, n: int = -1) -> bytes:
        return self._response.read(None if n < 0 else n)  # type: ignore[no-any-return]

    def readinto(self, buffer: memoryview | bytearray) -> int:
        return self._response.readinto(buffer)  # type: ignore[no-any-return]

    def close(self) -> None:
        self._response.close()
        self._response.release_conn()

    def __enter__(self) -> _ResponseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_blob_store(url: str, *, access_key: str = "", secret_key: str = "", tmp_dir: Path) -> BlobStore:
    """Build the blob store a storage URL names: a path / file:// URL, or s3://BUCKET?endpoint=HOST:PORT."""
    if url.startswith("s3://"):
        return S3BlobStore(url, access_key, secret_key, tmp_dir=tmp_dir)  # type: ignore[return-value]
    path = Path(urlparse(url).path) if url.startswith("file://") else Path(url)
    return FileBlobStore(path)  # type: ignore[return-value]
