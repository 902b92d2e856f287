"""Red team: addresses request{} must never connect to, in the forms that hide them.

An allowlisted name whose DNS the plugin's author controls can resolve to any
address; the daemon checks the address at connect time. IPv4 addresses carried
inside IPv6 ones (mapped, 6to4, Teredo) are judged as the IPv4 address, and the
cloud metadata services that are not link-local (AWS's IPv6 endpoint,
Alibaba's) are refused like 169.254.169.254.
"""

from __future__ import annotations

import pytest
from strongroomd import outbound


@pytest.mark.parametrize(
    "addr",
    [
        "::ffff:169.254.169.254",
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "fd00:ec2::254",
        "100.100.100.200",
        "64:ff9b::a9fe:a9fe",
        "::a9fe:a9fe",
    ],
)
def test_hidden_internal_addresses_are_refused(addr: str) -> None:
    assert outbound.refused_address(addr, loopback_http=False)


@pytest.mark.parametrize("addr", ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
def test_public_addresses_are_not(addr: str) -> None:
    assert not outbound.refused_address(addr, loopback_http=False)
