"""Rotation policies and scheduled deletions, with the keyring's clock moved by the test.

An in-process keyring over a real SoftHSM token and a real SQLite store: the
clock is injected, so what a month of waiting would do happens in one call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from strongroomd._token import Token
from strongroomd.auth import Principal
from strongroomd.config import Config
from strongroomd.context import Owner
from strongroomd.errors import Forbidden
from strongroomd.keyring import Keyring
from strongroomd.keyspec import KeySpec
from strongroomd.store import GroupRow, Store, now_stamp

from tests.daemon.token_fixture import softhsm_token

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world(tmp_path: Path):
    conf = softhsm_token()
    loop = asyncio.new_event_loop()
    store = Store(tmp_path / "db")
    loop.run_until_complete(store.open())
    token = loop.run_until_complete(Token.open(conf.module, conf.label, conf.pin))
    clock = Clock()
    keyring = Keyring(Config(), store, token, clock=clock)
    group = GroupRow("g1", "g1", "", now_stamp())
    loop.run_until_complete(store.insert(group))
    admin = Principal("admin", "a1", "admin", frozenset({"g1"}), "g1")
    yield loop, keyring, clock, admin, Owner(id="test", principal=admin)
    loop.run_until_complete(keyring.close())
    loop.run_until_complete(token.close())
    loop.run_until_complete(store.close())
    loop.close()


def test_a_rotation_policy_fires_when_due_and_not_before(world) -> None:
    loop, kr, clock, admin, owner = world
    spec = KeySpec(
        "AES",
        name="rotating",
        key_size=256,
        group_id="g1",
        rotation_policy={"interval_days": 30, "deactivate_rotated_key": True},
    )
    first = loop.run_until_complete(kr.create(owner, admin, spec))
    row = kr.use(owner, admin, {"name": "rotating"}, "ENCRYPT")
    enc = loop.run_until_complete(kr.operate(row, "encrypt", {"plain": b"x"}))
    assert first.scheduled_rotation == now_stamp(clock.t + 30 * DAY)
    clock.t += 29 * DAY
    assert loop.run_until_complete(kr.tick()) == {"deleted": [], "rotated": []}
    clock.t += 2 * DAY
    done = loop.run_until_complete(kr.tick())
    assert len(done["rotated"]) == 1
    newest = kr.store.keys[kr.store.key_names["rotating"]]
    old = kr.store.keys[first.kid]
    assert newest.kid != first.kid
    assert newest.links == {"replaced": first.kid}
    assert old.links["replacement"] == newest.kid
    assert old.name.startswith("rotating (rotated at ")
    assert old.state == "Deactivated" and old.rotation_policy is None
    # The new version carries the policy on, counted from its own creation.
    assert newest.rotation_policy == spec.rotation_policy
    assert newest.scheduled_rotation == now_stamp(clock.t + 30 * DAY)
    # The old version still decrypts what it encrypted, and no longer encrypts.
    with pytest.raises(Forbidden):
        kr.use(owner, admin, {"kid": old.kid}, "ENCRYPT")
    sealed = {"mode": "GCM", "cipher": enc["cipher"], "iv": enc["iv"], "tag": enc["tag"]}
    plain = loop.run_until_complete(
        kr.operate(kr.use(owner, admin, {"kid": old.kid}, "DECRYPT"), "decrypt", sealed)
    )
    assert plain["plain"] == b"x"
    # By name, the newest version encrypts.
    assert kr.use(owner, admin, {"name": "rotating"}, "ENCRYPT").kid == newest.kid


def test_a_scheduled_deletion_happens_when_due_and_can_be_cancelled(world) -> None:
    loop, kr, clock, admin, owner = world
    a = loop.run_until_complete(
        kr.create(owner, admin, KeySpec("AES", name="a", key_size=256, group_id="g1"))
    )
    b = loop.run_until_complete(
        kr.create(owner, admin, KeySpec("AES", name="b", key_size=256, group_id="g1"))
    )
    loop.run_until_complete(kr.schedule_deletion(owner, admin, a.kid, 7))
    loop.run_until_complete(kr.schedule_deletion(owner, admin, b.kid, 7))
    with pytest.raises(Forbidden, match="scheduled for deletion"):
        kr.use(owner, admin, {"kid": a.kid}, "ENCRYPT")
    loop.run_until_complete(kr.cancel_deletion(owner, admin, b.kid))
    kr.use(owner, admin, {"kid": b.kid}, "ENCRYPT")
    clock.t += 6 * DAY
    assert loop.run_until_complete(kr.tick())["deleted"] == []
    clock.t += 2 * DAY
    assert loop.run_until_complete(kr.tick())["deleted"] == [a.kid]
    assert a.kid not in kr.store.keys and a.kid not in kr.token.kids()
    assert b.kid in kr.store.keys and b.kid in kr.token.kids()


def test_dates_move_the_state(world) -> None:
    loop, kr, clock, admin, owner = world
    later = now_stamp(clock.t + DAY)
    k = loop.run_until_complete(
        kr.create(
            owner,
            admin,
            KeySpec(
                "AES",
                name="dated",
                key_size=256,
                group_id="g1",
                activation_date=later,
                deactivation_date=now_stamp(clock.t + 10 * DAY),
            ),
        )
    )
    with pytest.raises(Forbidden, match="not active yet"):
        kr.use(owner, admin, {"kid": k.kid}, "DECRYPT")
    clock.t += 2 * DAY
    kr.use(owner, admin, {"kid": k.kid}, "ENCRYPT")
    clock.t += 10 * DAY
    with pytest.raises(Forbidden, match="deactivated"):
        kr.use(owner, admin, {"kid": k.kid}, "ENCRYPT")
    kr.use(owner, admin, {"kid": k.kid}, "DECRYPT")
