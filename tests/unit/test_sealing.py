"""Sealing signing secrets: the first key seals, every key opens, and a missing or unknown key
is an error that says what to set, never a wrong value."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from config.settings import settings_from
from sandbox.stack import Stack
from workers.sealing import Sealer, SealingError, new_key

SECRET = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw=="
OLD, NEW = new_key(), new_key()


def test_a_sealed_secret_opens_and_does_not_show_the_secret() -> None:
    sealer = Sealer([NEW])
    sealed = sealer.seal(SECRET)
    assert SECRET not in sealed and SECRET.removeprefix("whsec_") not in sealed
    assert sealer.seal(SECRET) != sealed  # a fresh IV each time: equal secrets do not show
    assert sealer.unseal(sealed) == SECRET


def test_the_first_key_seals_and_every_key_opens() -> None:
    under_old = Sealer([OLD]).seal(SECRET)
    both = Sealer([NEW, OLD])
    assert both.unseal(under_old) == SECRET
    Fernet(NEW).decrypt(both.seal(SECRET).encode())  # sealed with the first key


def test_reseal_moves_a_value_to_the_first_key_once() -> None:
    both = Sealer([NEW, OLD])
    resealed = both.reseal(Sealer([OLD]).seal(SECRET))
    assert resealed is not None
    assert Sealer([NEW]).unseal(resealed) == SECRET  # the old key is no longer needed
    assert both.reseal(resealed) is None


def test_a_value_no_key_opens_is_a_clear_error() -> None:
    stranger = Sealer([new_key()]).seal(SECRET)
    with pytest.raises(SealingError, match="none of the keys in SECRET_KEYS"):
        Sealer([NEW, OLD]).unseal(stranger)
    with pytest.raises(SealingError, match="none of the keys in SECRET_KEYS"):
        Sealer([NEW, OLD]).reseal(stranger)


def test_without_keys_a_process_starts_and_only_use_fails() -> None:
    sealer = Sealer.from_settings(settings_from({}))  # what a process with no env builds
    for use in (sealer.check, lambda: sealer.seal(SECRET), lambda: sealer.unseal("x")):
        with pytest.raises(SealingError, match="SECRET_KEYS is empty"):
            use()


def test_a_malformed_key_fails_at_start_without_showing_the_key() -> None:
    bad = "not-a-fernet-key-but-long-enough-to-look-like-one"
    with pytest.raises(SealingError, match=r"SECRET_KEYS\[1\] is not a Fernet key") as caught:
        Sealer([NEW, bad])
    assert bad not in str(caught.value) and NEW not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_keys_come_from_secret_keys_as_a_json_list() -> None:
    settings = settings_from({"SECRET_KEYS": json.dumps([NEW, OLD])})
    assert NEW not in repr(settings) and NEW not in str(settings.model_dump())
    assert Sealer.from_settings(settings).unseal(Sealer([OLD]).seal(SECRET)) == SECRET


def test_the_embedded_stack_makes_one_key_and_keeps_it_private(tmp_path: Path) -> None:
    stack = Stack(tmp_path, environ={})
    keys = stack._secret_keys()
    assert stack._secret_keys() == keys  # a restarted stack opens what its database holds
    assert stat.S_IMODE((tmp_path / "secret_keys.json").stat().st_mode) == 0o600
    Sealer(json.loads(keys)).check()
