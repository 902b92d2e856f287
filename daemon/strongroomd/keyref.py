"""What the token layer is told about keys, and what it reports back.

Plain frozen values, so the database layer and the token layer can share
them without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KeyMaterial", "KeyRef", "NewKey"]


@dataclass(frozen=True, slots=True)
class KeyRef:
    """An existing key, as the daemon's database knows it.

    ``key_size`` is in bits; for HMAC keys it is the size of the value the
    caller gave (the token may hold a zero-padded copy); for EC keys it is
    the curve's size.
    """

    kid: str
    obj_type: str
    key_size: int | None
    curve: str | None
    transient: bool
    public_only: bool = False


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key to make. ``exportable`` False makes it sensitive and unextractable."""

    kid: str
    name: str
    obj_type: str
    key_size: int | None
    curve: str | None
    exportable: bool
    transient: bool


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """What the token reports about a key it just made or imported."""

    obj_type: str
    key_size: int | None
    curve: str | None
    pub_key: bytes | None
    public_only: bool
