"""Sealing tenant signing secrets for storage: Fernet tokens under the keys in SECRET_KEYS.

The first key seals; every key opens, so a new key can be put first while rows sealed with
the old one are still read, until `kling secrets rotate` has resealed them all.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from config import Settings


class SealingError(RuntimeError):
    """A secret cannot be sealed or opened with the configured keys."""


class Sealer:
    """Seals and opens secrets with SECRET_KEYS; built once per process from the settings."""

    def __init__(self, keys: Sequence[str]) -> None:
        # A malformed key fails here, when the process starts, rather than at first use.
        self._fernets = [_fernet(index, key) for index, key in enumerate(keys)]

    @classmethod
    def from_settings(cls, settings: Settings) -> Sealer:
        return cls([key.get_secret_value() for key in settings.secret_keys])

    def check(self) -> None:
        """Raise `SealingError` now, rather than at first use, if there is no key."""
        self._keys()

    def seal(self, secret: str) -> str:
        return self._keys().encrypt(secret.encode()).decode()

    def unseal(self, sealed: str) -> str:
        try:
            return self._keys().decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise _unknown_key() from None

    def reseal(self, sealed: str) -> str | None:
        """The value sealed again with the first key, or None when it already is."""
        keys = self._keys()
        try:
            self._fernets[0].decrypt(sealed.encode())
            return None
        except InvalidToken:
            pass  # sealed with an older key (or with none of them: rotate says which)
        try:
            return keys.rotate(sealed.encode()).decode()
        except InvalidToken:
            raise _unknown_key() from None

    def _keys(self) -> MultiFernet:
        # Processes that never touch tenant secrets run without keys; only use needs them.
        if not self._fernets:
            raise SealingError(
                "SECRET_KEYS is empty: set it to a JSON list of Fernet keys to store or read "
                "tenant signing secrets"
            )
        return MultiFernet(self._fernets)


def new_key() -> str:
    """A fresh Fernet key, as SECRET_KEYS lists them."""
    return Fernet.generate_key().decode()


def _unknown_key() -> SealingError:
    return SealingError(
        "a stored signing secret opens with none of the keys in SECRET_KEYS: put the key it "
        "was sealed with back in the list"
    )


def _fernet(index: int, key: str) -> Fernet:
    try:
        return Fernet(key)
    except ValueError:
        # Never the key itself in the message: it ends up in logs.
        raise SealingError(
            f"SECRET_KEYS[{index}] is not a Fernet key (32 url-safe base64-encoded bytes)"
        ) from None
