"""API keys for inference: who may classify, and who may steer the routing.

Keys are stored as SHA-256 hashes (a key is 32 random bytes, so a plain hash is enough: there
is nothing to guess), read from a YAML/JSON file or an environment variable (a Kubernetes
Secret), and every stored hash is compared in constant time on every request, so neither
the answer nor its timing says which keys exist.

Access fails closed: a gateway without a key does not start, and a configured source that
holds none (an empty key file, the variable set to ``[]``, ``null`` or the cluster Secret's
placeholder) is a start-up error naming it, never a quiet switch to open access. Open access
is a setting of its own, ``access.required: false`` (local runs on 127.0.0.1), and the
start-up log says so.

``protege keys new NAME [--overrides]`` makes a key and prints the entry to store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from serving.config_sections import AccessConfig

KEY_PREFIX = "pk_"
PLACEHOLDER = "REPLACE_ME"  # how the shipped cluster Secret's value begins (k8s/base/secret.yaml)


class StoredKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, description="Who holds it (for the logs)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    overrides: bool = Field(default=False, description="May send force_tier and threshold")


_KEYS = TypeAdapter(list[StoredKey])


class AccessError(Exception):
    """A refused request: 401 (no or unknown key) or 403 (the key may not do this)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Caller:
    name: str  # "anonymous" when authentication is off
    overrides: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(name: str, overrides: bool = False) -> tuple[str, StoredKey]:
    """A fresh key (give it to the client) and its stored entry (put it in the key file)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, StoredKey(name=name, sha256=hash_key(key), overrides=overrides)


def load_keys(config: AccessConfig) -> list[StoredKey]:
    """The configured keys (the file's, then the variable's). A configured source without a
    key is an error naming it, and so is no key at all unless ``config.required`` is false."""
    keys: list[StoredKey] = []
    if (path := config.keys_file) is not None:
        keys += _parse(
            f"API key file {path}",
            lambda: yaml.safe_load(path.read_text()),
            f"add one with `protege keys new NAME --file {path}`",
        )
    if (raw := os.environ.get(config.keys_env)) is not None:
        keys += _parse(
            f"${config.keys_env}",
            lambda: _json_keys(raw),
            "set it to the JSON list `protege keys new NAME` prints (in a cluster: in the "
            "protege-secrets Secret), or unset it for a local gateway with access.required: false",
        )
    if not keys and config.required:
        raise ValueError(
            f"no API key configured (access.keys_file is not set and ${config.keys_env} is "
            "not set): make one with `protege keys new NAME --file api-keys.yaml` and set "
            f"access.keys_file to that file, or put the entry it prints in ${config.keys_env}; "
            "for open access on a local gateway, set access.required: false"
        )
    return keys


def _json_keys(raw: str) -> object:
    if raw.strip().startswith(PLACEHOLDER):
        raise ValueError("it still holds the shipped placeholder, not a key")
    return json.loads(raw) if raw.strip() else None


def _parse(source: str, read: Callable[[], object], fix: str) -> list[StoredKey]:
    try:
        keys = _KEYS.validate_python(read() or [])
    except (OSError, ValueError, ValidationError) as exc:
        reason = " ".join(str(exc).split())  # one line
        raise ValueError(f"{source} cannot be read: {reason}; {fix}") from None
    if not keys:  # fails closed: an empty source never turns authentication off
        raise ValueError(f"{source} holds no API key: {fix}")
    return keys


class Gatekeeper:
    """Checks the ``Authorization`` header against the stored keys."""

    def __init__(self, keys: list[StoredKey], anonymous_overrides: bool = False) -> None:
        self._keys = list(keys)
        self._anonymous = Caller("anonymous", anonymous_overrides)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def describe(self) -> str:
        if self.enabled:
            allowed = sum(k.overrides for k in self._keys)
            return f"API keys required ({len(self._keys)} keys, {allowed} may steer the routing)"
        steering = "allowed" if self._anonymous.overrides else "refused"
        return (
            "authentication OFF (access.required: false): any client may classify "
            f"(routing overrides {steering})"
        )

    def caller(self, authorization: str | None) -> Caller:
        if not self.enabled:
            return self._anonymous
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AccessError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        digest = hash_key(token.strip())
        match = None
        for key in self._keys:  # no early exit: the time taken does not depend on the match
            if hmac.compare_digest(digest, key.sha256):
                match = key
        if match is None:
            raise AccessError(401, "API key not recognised")
        return Caller(match.name, match.overrides)

    @staticmethod
    def check_overrides(caller: Caller, fields: list[str]) -> None:
        if fields and not caller.overrides:
            raise AccessError(
                403,
                f"this API key may not use routing overrides ({', '.join(fields)}); "
                "leave them out, or ask for a key with overrides allowed",
            )


def gatekeeper(config: AccessConfig) -> Gatekeeper:
    """The configured keys' gatekeeper; open only with ``required: false`` and no key."""
    return Gatekeeper(load_keys(config), config.anonymous_overrides)


def write_entry(path: Path, entry: StoredKey) -> None:
    """Add ``entry`` to a key file (created if missing), refusing a duplicate name."""
    existing = (
        _KEYS.validate_python(yaml.safe_load(path.read_text()) or []) if path.exists() else []
    )
    if any(k.name == entry.name for k in existing):
        raise ValueError(f"{path} already holds a key named {entry.name!r}")
    rows = [k.model_dump() for k in [*existing, entry]]
    path.write_text(yaml.safe_dump(rows, sort_keys=False))


def steering_key(folder: Path, name: str = "local-steering") -> tuple[str, Path]:
    """A fresh key allowed the routing overrides, stored (hashed) in ``folder/api-keys.yaml``:
    for benchmarks and tests that force a tier on a gateway of their own."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "api-keys.yaml"
    path.unlink(missing_ok=True)
    key, entry = new_key(name, overrides=True)
    write_entry(path, entry)
    return key, path
