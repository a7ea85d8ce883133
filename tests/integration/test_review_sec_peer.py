"""Security review: what a peer holding a valid mesh certificate can make the inbound (15008) do, on the loopback
two-node mesh (tests/integration/proxy_mesh.py). The peer here is a hand-driven HBONE client with the certificate
of `sleep` (the identity of the pod `client` on n1), as a compromised node that runs a `sleep` pod holds.

What holds (guards, pass): a CONNECT whose `:authority` names another address than the pod the connection reached
(a node address, loopback, another pod) is 400; one naming an agent port of the pod is 503 (ztunnel's SelfCall).

What did not (pinned by a strict xfail until the fix): the inbound took the client address from `forwarded: for=`
whenever the workload named there had the peer's identity, without knowing whether that workload was anywhere near
the peer, since agents tunnelled from the node's address. A peer holding one `sleep` certificate could claim the
address of any `sleep` workload of the mesh and pass a policy's `ipBlocks` (or dodge `notIpBlocks`) meant for that
one. Now, as ztunnel (src/proxy/inbound.rs: `get_original_src_from_fwded` only `if from_waypoint`; the pool's
WorkloadKey holds the source IP), agents tunnel from the client pod's own address, which the network vouches for
(agent/pool.py PoolKey.source), and the inbound judges the TCP source, whatever `forwarded` says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import pytest

from agent.pool import PoolKey
from agent.tunnel import HboneConnectError
from api.istio.security import authorization_pb2 as apb
from tests.integration.proxy_mesh import ECHO_PORT, Mesh, put_addresses
from tests.support.workloads import pod_workload


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as m:
        # Another pod of the identity `sleep`, on a third node: the address a policy singles out below.
        m.ip["twin"] = m.net + "12"
        m.workloads["twin"] = pod_workload("sleep-2", "client", m.ip["twin"], sa="sleep", node="n3", deployment="sleep")
        put_addresses(m.store, list(m.workloads.values()))
        yield m


async def _connect(mesh: Mesh, authority: str, headers: list[tuple[str, str]], source: str | None = None) -> int:
    """The status the inbound of echo-1 answers a CONNECT from a peer proving `sleep` (200 when the stream opens),
    tunnelled from `source` (default: n1's own address)."""
    ident = mesh.identity("client")
    key = PoolKey(ident, mesh.identity("echo-1"), (mesh.ip["echo-1"], 15008), source=source)
    try:
        stream = await mesh.n1.pool.open_stream(key, await mesh.certs.client_context(ident), authority, headers)
    except HboneConnectError as e:
        return e.status
    stream.reset()
    return 200


def _allow_only_from(ip: str) -> apb.Authorization:
    net = ipaddress.ip_address(ip)
    block = apb.Address(address=net.packed, length=net.max_prefixlen)
    return apb.Authorization(
        name="only-twin",
        namespace="server",
        scope=apb.WORKLOAD_SELECTOR,
        action=apb.ALLOW,
        groups=[apb.Group(rules=[apb.Rules(matches=[apb.Match(source_ips=[block])])])],
    )


@pytest.mark.parametrize(
    "authority",
    ["127.0.0.1:15000", "127.0.0.1:10250", "{stranger}:8080", "{echo-2}:8080", "[::1]:8080", "localhost:8080"],
)
async def test_authority_naming_another_address_is_refused(mesh: Mesh, authority: str) -> None:
    assert await _connect(mesh, authority.format(**mesh.ip), []) == 400


@pytest.mark.parametrize("port", [15001, 15006, 15008])
async def test_authority_naming_an_agent_port_is_refused(mesh: Mesh, port: int) -> None:
    assert await _connect(mesh, f"{mesh.ip['echo-1']}:{port}", []) == 503


async def test_the_peers_own_address_passes_the_policy_meant_for_it(mesh: Mesh) -> None:
    """The control: `sleep`'s real source (client, tunnelled by its agent from client's address) passes an ipBlock
    naming client, and the same peer from its node's address does not."""
    mesh.set_policies(_allow_only_from(mesh.ip["client"]), selector={"echo-1": ["server/only-twin"]})
    own = [("forwarded", f'for="{mesh.ip["client"]}:40000"')]
    assert await _connect(mesh, f"{mesh.ip['echo-1']}:{ECHO_PORT}", own, source=mesh.ip["client"]) == 200
    assert await _connect(mesh, f"{mesh.ip['echo-1']}:{ECHO_PORT}", own) == 401


async def test_a_peer_cannot_claim_the_address_of_another_workload_of_its_identity(mesh: Mesh) -> None:
    """A peer holding `sleep`'s certificate claims twin's address (twin runs on n3, which the peer is not) to pass
    a policy that admits twin's address alone. It must be judged by its own address and refused (401)."""
    mesh.set_policies(_allow_only_from(mesh.ip["twin"]), selector={"echo-1": ["server/only-twin"]})
    forged = [("forwarded", f'for="{mesh.ip["twin"]}:40000"')]
    assert await _connect(mesh, f"{mesh.ip['echo-1']}:{ECHO_PORT}", forged) == 401
    assert await _connect(mesh, f"{mesh.ip['echo-1']}:{ECHO_PORT}", forged, source=mesh.ip["client"]) == 401
