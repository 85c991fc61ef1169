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

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator

Change = Callable[[bytes | None], bytes | None]
"""Given an object's content (None: absent), its new content (None: leave it as it is)."""

UPDATE_ATTEMPTS = 20
REQUEST_TIMEOUT_S = 30.0
TRANSFER_TIMEOUT_S = 900.0  # a whole file (model weights) up or down


class StorageError(OSError):
    """The store cannot be used; the message names its URI."""


def _as_text(value: object) -> object:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


StoreURI = Annotated[str, BeforeValidator(_as_text)]
"""A config field naming a store: a folder (a str or a Path) or ``s3://bucket/prefix``."""


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

    def check_conditional_writes(self) -> None:
        """Raise StorageError if create and update cannot be trusted (a folder always can)."""

    def matches(self, key: str, data: bytes) -> bool:
        """Whether ``key`` holds exactly ``data`` (a create that found its own earlier
        write, or another's, tells them apart with this)."""
        return self.read(key) == data

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
    """An S3-compatible bucket prefix through s3fs.

    Every request has a deadline of its own (``REQUEST_TIMEOUT_S``, ``TRANSFER_TIMEOUT_S``
    for whole files): a store that accepts connections and then never answers (a paused or
    partitioned server) raises StorageError instead of holding the caller forever (the S3
    client's read timeout does not cover a request waiting on ``100-continue``)."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        attempts: int = 3,
        request_timeout_s: float | None = None,
    ) -> None:
        """``attempts``: tries per request inside the S3 client, and ``request_timeout_s``
        its deadline (shorter where the caller has its own counted retry loop, as log
        shipping does)."""
        self.request_timeout_s = request_timeout_s
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
            config_kwargs={
                "retries": {"max_attempts": attempts, "mode": "standard"},
                "connect_timeout": 5,
                "read_timeout": 10,
            },
        )
        self.fs.retries = attempts  # s3fs's own retry loop around each call (default 5)

    def _run(self, coroutine: Callable[..., Any], *args: Any, timeout: float = 0, **kw: Any) -> Any:
        """Run one of s3fs's coroutines on its loop within a deadline. A request cancelled
        at its deadline may still have reached the store: every write here is made safe to
        repeat (create and update recognise their own earlier write). Errors come out as
        OSError (StorageError unless s3fs already made one)."""
        limit = timeout or self.request_timeout_s or REQUEST_TIMEOUT_S
        future = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(coroutine(*args, **kw), limit), self.fs.loop
        )
        try:
            return future.result(timeout=limit + 5)  # the loop itself could be stuck
        except (asyncio.TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            raise StorageError(f"object store {self.uri} did not answer within {limit} s") from None
        except OSError:
            raise
        except Exception as exc:  # botocore's connection errors are not OSError
            raise StorageError(f"object store {self.uri}: {exc}") from exc

    def _s3(self, method: str, **kwargs: Any) -> Any:
        body = kwargs.get("Body", b"")
        # a large body gets a second per MB on top (a store slower than 1 MB/s times out)
        timeout = (self.request_timeout_s or REQUEST_TIMEOUT_S) + len(body) / 1e6
        return self._run(self.fs._call_s3, method, Bucket=self.bucket, timeout=timeout, **kwargs)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{self._key(key)}"

    def read(self, key: str) -> bytes | None:
        return self._tagged(key)[0]

    def _tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's content and ETag, read in one request (None, None when absent)."""

        async def get() -> tuple[bytes, str]:
            reply = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
            async with reply["Body"] as stream:
                return bytes(await stream.read()), str(reply["ETag"])

        try:
            data, etag = self._run(get)
        except FileNotFoundError:
            return None, None
        return data, etag

    def write(self, key: str, data: bytes) -> None:
        self._s3("put_object", Key=self._key(key), Body=data)

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
        """True if written, False if the condition did not hold (412). A 409 (another
        conditional write to the key in flight) is an error to retry, not an answer."""
        try:
            self._s3("put_object", Key=self._key(key), Body=data, **condition)
            return True
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise

    def matches(self, key: str, data: bytes) -> bool:
        try:
            head = self._s3("head_object", Key=self._key(key))
        except FileNotFoundError:
            return False
        if int(head.get("ContentLength", -1)) != len(data):
            return False

        async def get() -> bytes:
            reply = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
            async with reply["Body"] as stream:
                return bytes(await stream.read())

        limit = (self.request_timeout_s or REQUEST_TIMEOUT_S) + len(data) / 1e6
        return bool(self._run(get, timeout=limit) == data)

    def list(self, prefix: str) -> list[str]:
        try:
            found = self._run(self.fs._find, self._path(prefix))
        except FileNotFoundError:
            return []
        root = self._path("")
        return sorted(p.removeprefix(root) for p in found if not p.endswith("/"))

    def upload(self, local: Path, key: str) -> None:
        self._run(self.fs._put_file, str(local), self._path(key), timeout=TRANSFER_TIMEOUT_S)

    def download(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.part")
        try:
            self._run(self.fs._get_file, self._path(key), str(tmp), timeout=TRANSFER_TIMEOUT_S)
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def check(self) -> None:
        try:
            self._s3("head_bucket")
        except Exception as exc:
            raise StorageError(f"object store {self.uri} cannot be reached: {exc}") from exc

    def check_conditional_writes(self) -> None:
        """Raise StorageError unless the store refuses a create over an existing object and a
        write with a stale ETag: without that, compare-and-set would silently not hold."""
        probe = f".protege-probe-{uuid.uuid4().hex}"
        try:
            honoured = self.create(probe, b"1") and not self.create(probe, b"2")
            honoured = honoured and not self._put_if(probe, b"3", IfMatch='"stale"')
        finally:
            with contextlib.suppress(OSError):
                self._s3("delete_object", Key=self._key(probe))
        if not honoured:
            raise StorageError(
                f"object store {self.uri} ignores conditional writes (If-None-Match/If-Match): "
                "the registry pointer, the run lease and log shipping need them"
            )


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs error is S3's 412 (a conditional write that did not hold)."""
    for error in _chain(exc):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
    return False


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def open_store(
    uri: str | Path,
    endpoint_url: str | None = None,
    attempts: int = 3,
    request_timeout_s: float | None = None,
) -> Store:
    """A Store for ``uri``: ``s3://bucket/prefix`` or a local folder."""
    if is_remote(uri):
        return ObjectStore(str(uri), endpoint_url, attempts, request_timeout_s)
    if "://" in str(uri):
        raise StorageError(f"{uri}: only local folders and s3:// URIs are supported")
    return LocalStore(uri)
