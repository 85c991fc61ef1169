"""Where the registry and the shipped log live: a local folder or an S3-compatible object
store (``s3://bucket/prefix``), behind the few operations both need.

What each write promises, on both:

- ``write`` replaces a whole object (locally a temporary file renamed over the old one):
  a reader sees the old or the new content, never part of one.
- ``create`` writes an object only if none exists (S3 ``If-None-Match: *``; locally a hard
  link that fails on an existing name): an object made this way is never rewritten.
- ``update`` is a compare-and-set loop on one small object (S3 ``If-Match`` on its ETag, or
  ``If-None-Match`` when it is absent; locally an advisory lock around read and replace).

Object-store access goes through fsspec's ``s3fs``; the conditional writes use the S3 client
that ``s3fs`` wraps (``call_s3``), since fsspec has no API for ``If-Match``. The endpoint
comes from ``endpoint_url`` or ``$AWS_ENDPOINT_URL``; credentials from the usual AWS
environment variables (a Secret on Kubernetes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

Change = Callable[[bytes | None], bytes | None]
"""Given an object's content (None: absent), its new content (None: leave it as it is)."""

UPDATE_ATTEMPTS = 20


class StorageError(OSError):
    """The store cannot be used; the message names its URI."""


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


class Store:
    """One root (a folder or a bucket prefix); keys are '/'-separated paths below it."""

    uri: str

    def read(self, key: str) -> bytes | None:
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> bool:
        """Write ``data`` only if ``key`` is absent; False if it exists (left untouched)."""
        raise NotImplementedError

    def update(self, key: str, change: Change) -> bytes | None:
        """Apply ``change`` atomically against concurrent updates; the content it leaves."""
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Keys below ``prefix`` (recursively), sorted; [] when there are none."""
        raise NotImplementedError

    def upload(self, local: Path, key: str) -> None:
        raise NotImplementedError

    def download(self, key: str, local: Path) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise StorageError naming the URI if the store cannot be reached."""
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """The key's own path when the store is a local folder, else None."""
        return None


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._staged(path, data)
        os.replace(tmp, path)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._staged(path, data)
        try:
            os.link(tmp, path)  # fails on an existing name: never rewritten
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def update(self, key: str, change: Change) -> bytes | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: excludes threads too
            try:
                old = self.read(key)
                new = change(old)
                if new is None:
                    return old
                self.write(key, new)
                return new
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        found = (p for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))
        return sorted(str(p.relative_to(self.root)) for p in found)

    def upload(self, local: Path, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, path)

    def download(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"storage {self.uri} cannot be used: {exc}") from exc

    @staticmethod
    def _staged(path: Path, data: bytes) -> Path:
        """``data`` in a fsynced temporary file beside ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return tmp


class ObjectStore(Store):
    """An S3-compatible bucket prefix through s3fs."""

    def __init__(self, uri: str, endpoint_url: str | None = None) -> None:
        import s3fs  # imported here: local-only installs never need it

        self.uri = uri.rstrip("/")
        bucket_and_prefix = self.uri.removeprefix("s3://")
        self.bucket, _, self.prefix = bucket_and_prefix.partition("/")
        if not self.bucket:
            raise StorageError(f"{uri!r} names no bucket: use s3://BUCKET/PREFIX")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            skip_instance_cache=True,
            use_listings_cache=False,
            # a few quick retries inside the client; callers retry longer outages
            config_kwargs={
                "retries": {"max_attempts": 3, "mode": "standard"},
                "connect_timeout": 5,
                "read_timeout": 10,
            },
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{self._key(key)}"

    def read(self, key: str) -> bytes | None:
        return self._tagged(key)[0]

    def _tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's content and ETag, read in one request (None, None when absent)."""
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            reply = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
            async with reply["Body"] as stream:
                return bytes(await stream.read()), str(reply["ETag"])

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None
        return data, etag

    def write(self, key: str, data: bytes) -> None:
        self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        return self._put_if(key, data, IfNoneMatch="*")

    def update(self, key: str, change: Change) -> bytes | None:
        for _ in range(UPDATE_ATTEMPTS):
            old, etag = self._tagged(key)
            new = change(old)
            if new is None:
                return old
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            if self._put_if(key, new, **condition):
                return new
        raise StorageError(f"{self.uri}/{key} kept changing under {UPDATE_ATTEMPTS} updates")

    def _put_if(self, key: str, data: bytes, **condition: str) -> bool:
        try:
            self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self._key(key), Body=data, **condition
            )
            return True
        except (FileExistsError, OSError) as exc:
            if _precondition_failed(exc):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        root = self._path("")
        return sorted(p.removeprefix(root) for p in found if not p.endswith("/"))

    def upload(self, local: Path, key: str) -> None:
        self.fs.put_file(str(local), self._path(key))

    def download(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        try:
            self.fs.get_file(self._path(key), str(tmp))
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def check(self) -> None:
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except Exception as exc:
            raise StorageError(f"object store {self.uri} cannot be reached: {exc}") from exc


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs error is S3's 412 (a conditional write that did not hold)."""
    for error in _chain(exc):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return True
    return False


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def open_store(uri: str | Path, endpoint_url: str | None = None) -> Store:
    """A Store for ``uri``: ``s3://bucket/prefix`` or a local folder."""
    if is_remote(uri):
        return ObjectStore(str(uri), endpoint_url)
    if "://" in str(uri):
        raise StorageError(f"{uri}: only local folders and s3:// URIs are supported")
    return LocalStore(uri)
