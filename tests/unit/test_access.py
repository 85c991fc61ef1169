"""API keys: stored hashed, read from a file or the environment, refused with 401/403."""

import json

import pytest

from serving.access import (
    PLACEHOLDER,
    AccessError,
    Gatekeeper,
    gatekeeper,
    hash_key,
    load_keys,
    new_key,
    steering_key,
    write_entry,
)
from serving.config import AccessConfig


def test_a_new_key_is_stored_only_as_its_hash(tmp_path):
    key, entry = new_key("billing-app")
    assert key.startswith("pk_") and len(key) > 40
    assert entry.sha256 == hash_key(key) and key not in entry.model_dump_json()
    write_entry(tmp_path / "keys.yaml", entry)
    assert key not in (tmp_path / "keys.yaml").read_text()
    assert load_keys(AccessConfig(keys_file=tmp_path / "keys.yaml")) == [entry]


def test_a_key_file_refuses_a_second_key_of_the_same_name(tmp_path):
    write_entry(tmp_path / "keys.yaml", new_key("app")[1])
    with pytest.raises(ValueError, match="already holds a key named 'app'"):
        write_entry(tmp_path / "keys.yaml", new_key("app")[1])


def test_keys_come_from_the_environment_too(monkeypatch):
    key, entry = new_key("from-secret", overrides=True)
    monkeypatch.setenv("PROTEGE_API_KEYS", json.dumps([entry.model_dump()]))
    keeper = gatekeeper(AccessConfig())
    assert keeper.enabled
    assert keeper.caller(f"Bearer {key}").overrides


def test_an_unreadable_key_source_names_itself(tmp_path, monkeypatch):
    (tmp_path / "keys.yaml").write_text("- name: x\n  sha256: not-a-hash\n")
    with pytest.raises(ValueError, match=r"keys\.yaml cannot be read"):
        load_keys(AccessConfig(keys_file=tmp_path / "keys.yaml"))
    monkeypatch.setenv("MY_KEYS", "{not json")
    with pytest.raises(ValueError, match=r"\$MY_KEYS cannot be read"):
        load_keys(AccessConfig(keys_env="MY_KEYS"))


def test_open_access_is_a_setting_of_its_own_and_says_so(monkeypatch):
    monkeypatch.delenv("PROTEGE_API_KEYS", raising=False)
    keeper = gatekeeper(AccessConfig(required=False))
    assert not keeper.enabled
    assert "authentication OFF (access.required: false)" in keeper.describe()
    assert "overrides refused" in keeper.describe()
    caller = keeper.caller(None)
    assert caller.name == "anonymous" and not caller.overrides
    opened = AccessConfig(required=False, anonymous_overrides=True)
    assert gatekeeper(opened).caller(None).overrides


def test_no_key_at_all_is_refused_at_start_up_unless_access_is_opened(monkeypatch):
    monkeypatch.delenv("PROTEGE_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="no API key configured") as info:
        gatekeeper(AccessConfig())
    assert "protege keys new NAME" in str(info.value)
    assert "access.required: false" in str(info.value)


@pytest.mark.parametrize("value", ["[]", "null", "", "  "])
def test_a_key_variable_that_holds_no_key_is_refused_naming_it(monkeypatch, value):
    monkeypatch.setenv("PROTEGE_API_KEYS", value)
    for required in (True, False):  # a configured source fails closed, whatever `required`
        with pytest.raises(ValueError, match=r"\$PROTEGE_API_KEYS holds no API key") as info:
            gatekeeper(AccessConfig(required=required))
        assert "protege keys new NAME" in str(info.value)


@pytest.mark.parametrize("content", ["", "[]\n", "null\n", "# no keys yet\n"])
def test_a_key_file_that_holds_no_key_is_refused_naming_it(tmp_path, monkeypatch, content):
    monkeypatch.delenv("PROTEGE_API_KEYS", raising=False)
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    for required in (True, False):
        with pytest.raises(ValueError) as info:
            gatekeeper(AccessConfig(keys_file=path, required=required))
        assert str(info.value).startswith(f"API key file {path} holds no API key")
        assert f"protege keys new NAME --file {path}" in str(info.value)


def test_an_empty_source_is_refused_even_beside_one_with_keys(tmp_path, monkeypatch):
    write_entry(tmp_path / "keys.yaml", new_key("app")[1])
    monkeypatch.setenv("PROTEGE_API_KEYS", "[]")
    with pytest.raises(ValueError, match=r"\$PROTEGE_API_KEYS holds no API key"):
        gatekeeper(AccessConfig(keys_file=tmp_path / "keys.yaml"))


def test_the_shipped_placeholder_is_refused_saying_how_to_make_a_key(monkeypatch):
    monkeypatch.setenv("PROTEGE_API_KEYS", f"{PLACEHOLDER}: put a key here")
    with pytest.raises(ValueError, match="shipped placeholder") as info:
        gatekeeper(AccessConfig())
    assert "$PROTEGE_API_KEYS" in str(info.value) and "protege keys new NAME" in str(info.value)


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "pk_just-the-key"]
)
def test_a_missing_or_malformed_header_is_401_naming_the_header(header):
    keeper = Gatekeeper([new_key("app")[1]])
    with pytest.raises(AccessError) as info:
        keeper.caller(header)
    assert info.value.status_code == 401 and "Authorization: Bearer" in str(info.value)


def test_an_unknown_key_is_401_and_names_no_key():
    key, entry = new_key("app")
    keeper = Gatekeeper([entry])
    with pytest.raises(AccessError) as info:
        keeper.caller(f"Bearer {key}x")
    assert info.value.status_code == 401
    assert str(info.value) == "API key not recognised"
    assert keeper.caller(f"bearer {key}").name == "app"  # the scheme is case-insensitive


def test_overrides_are_refused_with_403_unless_the_key_allows_them():
    plain, plain_entry = new_key("plain")
    steer, steer_entry = new_key("steer", overrides=True)
    keeper = Gatekeeper([plain_entry, steer_entry])
    Gatekeeper.check_overrides(keeper.caller(f"Bearer {plain}"), [])  # none used: fine
    with pytest.raises(AccessError) as info:
        Gatekeeper.check_overrides(keeper.caller(f"Bearer {plain}"), ["force_tier"])
    assert info.value.status_code == 403 and "force_tier" in str(info.value)
    Gatekeeper.check_overrides(keeper.caller(f"Bearer {steer}"), ["force_tier", "threshold"])


def test_a_steering_key_file_is_fresh_each_time(tmp_path):
    first, path = steering_key(tmp_path)
    second, _ = steering_key(tmp_path)
    keeper = gatekeeper(AccessConfig(keys_file=path))
    assert keeper.caller(f"Bearer {second}").overrides
    with pytest.raises(AccessError):
        keeper.caller(f"Bearer {first}")
