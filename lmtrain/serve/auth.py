"""API keys for `lmtrain serve`: where they come from, how a request proves one, and where the server may bind."""

from __future__ import annotations

import hmac
import os

from lmtrain.paths import as_path

ENV_VAR = "LMTRAIN_API_KEYS"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeError(ValueError):
    """A `lmtrain serve` setting that cannot work; the message says what to change."""


def _split(text: str) -> list[str]:
    """Keys separated by commas, spaces or lines; '#' starts a comment line."""
    keys = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        keys += [k for k in line.replace(",", " ").split() if k]
    return keys


def load_keys(keys_file: str | None) -> list[str]:
    """The keys from --api-keys FILE, else from $LMTRAIN_API_KEYS; [] when neither gives one."""
    if keys_file:
        path = as_path(keys_file)
        if not path.is_file():
            raise ServeError(f"--api-keys {keys_file}: no such file; give a file with one key per line.")
        keys = _split(path.read_text())
        if not keys:
            raise ServeError(f"--api-keys {keys_file}: the file holds no key; write one key per line.")
        return keys
    return _split(os.environ.get(ENV_VAR, ""))


def check_bind(host: str, keys: list[str], insecure_no_auth: bool) -> None:
    """Refuse to serve a model without keys on an address other hosts can reach."""
    if not keys and host not in LOOPBACK and not insecure_no_auth:
        raise ServeError(f"--host {host} without API keys would let anyone on the network use the model; give "
                         f"--api-keys FILE or set {ENV_VAR}, or pass --insecure-no-auth if you mean it.")


class KeyCheck:
    """`allows(header)`: whether an Authorization header carries one of the keys (always, when there are none)."""

    def __init__(self, keys: list[str]):
        self._keys = [k.encode() for k in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        given_bytes = given.strip().encode()
        # Compare with every key, in constant time each, so the time taken says nothing about which is near.
        matches = [hmac.compare_digest(given_bytes, key) for key in self._keys]
        return scheme.lower() == "bearer" and any(matches)
