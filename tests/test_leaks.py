"""Nothing reaches where it does not belong: input URLs stay off internal networks, ordinary keys
see no other tenant's work or the network layout, LoRA names stay names, admins cannot lock
themselves out, batch manifests carry no spreadsheet formulas, dashboard forms work with CSRF."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest

from x2v_gateway.inputs import NotPublic, PublicOnlyTransport, is_public_address

# -- input URLs: IPv4 addresses hidden in IPv6 ones ----------------------------------------------

NOT_PUBLIC = [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "ff0e::1",
    # IPv4-mapped and IPv4-compatible
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "::169.254.169.254",
    # IPv4-translated (SIIT)
    "::ffff:0:127.0.0.1", "::ffff:0:192.168.0.1",
    # NAT64, the well-known prefix and the local-use one
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::c0a8:101", "64:ff9b:1::a00:1",
    "64:ff9b:1::808:808",
    # 6to4 of 127.0.0.1, 10.0.0.1 and 169.254.169.254
    "2002:7f00:1::", "2002:a00:1::1", "2002:a9fe:a9fe::",
    # Teredo: a client at 127.0.0.1 and at 10.0.0.1 (its address is stored XOR-ed with ones)
    "2001:0:4136:e378:8000:63bf:80ff:fffe", "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    # Teredo with a public client behind a private server
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",
    # ISATAP interface ids carrying a private IPv4 address
    "2600:1f00::5efe:a00:1", "2600:1f00::200:5efe:c0a8:1",
]
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
    "64:ff9b::808:808", "2002:808:808::1", "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
    "2600:1f00::5efe:808:808",
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_private_addresses_and_ipv6_forms_that_carry_them_are_not_public(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_and_ipv6_forms_of_public_ipv4_are_public(address):
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("host", ["64:ff9b::7f00:1", "2002:7f00:1::1", "::ffff:0:127.0.0.1"])
def test_input_url_naming_loopback_through_ipv6_is_refused_before_any_connection(host):
    async def fetch() -> httpx.Response:
        async with httpx.AsyncClient(transport=PublicOnlyTransport()) as client:
            return await client.get(f"http://[{host}]:8080/face.png")

    with pytest.raises(NotPublic, match="private or local address"):
        asyncio.run(fetch())
