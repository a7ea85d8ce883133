"""(d) The Envoy HBONE pair: what users would pick instead of Ambit, configured like the reference.

Client-side Envoy (node1): tcp_proxy with tunneling_config, an HTTP/2 CONNECT whose :authority is the destination
pod's ip:port, over mTLS (TLS 1.3, ALPN h2, no SNI, server SPIFFE SAN pinned) to the server-side Envoy on node2:15008.
Server-side Envoy: terminates mTLS (client certificate required, any spiffe://cluster.local/ SAN), accepts CONNECT,
and dials the :authority through an ORIGINAL_DST cluster: ztunnel's inbound behaviour. Both run --concurrency 1.
"""

from __future__ import annotations

from typing import Any

import yaml

from bench.certs import CLIENT_ID, SERVER_ID, TRUST_DOMAIN, CertFiles
from bench.drivers.node_pair import NodeProxyPair, PairAddresses
from bench.machine import venv_tool

HBONE_PORT = 15008
CLIENT_ECHO_PORT = 15001
CLIENT_IPERF_PORT = 15002

_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS13 = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}


def _addr(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


def _tunnel_listener(name: str, listen: tuple[str, int], target: tuple[str, int]) -> dict[str, Any]:
    baggage = f"k8s.cluster.name=Kubernetes,k8s.namespace.name={CLIENT_ID.namespace},k8s.deployment.name=client"
    return {
        "name": name,
        "address": _addr(*listen),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": _TCP_PROXY,
                            "stat_prefix": name,
                            "cluster": "hbone_upstream",
                            "tunneling_config": {
                                "hostname": f"{target[0]}:{target[1]}",
                                "headers_to_add": [
                                    {"header": {"key": "baggage", "value": baggage}},
                                    {
                                        "header": {
                                            "key": "forwarded",
                                            "value": "for=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                                        }
                                    },
                                ],
                            },
                        },
                    }
                ]
            }
        ],
    }


def client_config(certs: CertFiles, addrs: PairAddresses) -> dict[str, Any]:
    return {
        "admin": {"address": _addr("127.0.0.1", 15000)},
        "static_resources": {
            "listeners": [
                _tunnel_listener("outbound_echo", (addrs.client_node_ip, CLIENT_ECHO_PORT), addrs.echo_target),
                _tunnel_listener("outbound_iperf", (addrs.client_node_ip, CLIENT_IPERF_PORT), addrs.iperf_target),
            ],
            "clusters": [
                {
                    "name": "hbone_upstream",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "hbone_upstream",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _addr(addrs.server_node_ip, HBONE_PORT)}}]}
                        ],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": _HTTP_OPTIONS,
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": _UPSTREAM_TLS,
                            "common_tls_context": {
                                "alpn_protocols": ["h2"],
                                "tls_params": _TLS13,
                                "tls_certificates": [
                                    {
                                        "certificate_chain": {"filename": str(certs.client_cert)},
                                        "private_key": {"filename": str(certs.client_key)},
                                    }
                                ],
                                "validation_context": {
                                    "trusted_ca": {"filename": str(certs.root)},
                                    "match_typed_subject_alt_names": [
                                        {"san_type": "URI", "matcher": {"exact": str(SERVER_ID)}}
                                    ],
                                },
                            },
                        },
                    },
                }
            ],
        },
    }


def server_config(certs: CertFiles, addrs: PairAddresses) -> dict[str, Any]:
    hcm = {
        "@type": _HCM,
        "stat_prefix": "hbone_inbound",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": "hbone",
            "virtual_hosts": [
                {
                    "name": "hbone",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": "original_dst_by_authority",
                                "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    tls = {
        "@type": _DOWNSTREAM_TLS,
        "require_client_certificate": True,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_params": _TLS13,
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(certs.server_cert)},
                    "private_key": {"filename": str(certs.server_key)},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(certs.root)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TRUST_DOMAIN}/"}}
                ],
            },
        },
    }
    return {
        "admin": {"address": _addr("127.0.0.1", 15100)},
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone_inbound",
                    "address": _addr(addrs.server_node_ip, HBONE_PORT),
                    "filter_chains": [
                        {
                            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
                            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "original_dst_by_authority",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "2s",
                    "original_dst_lb_config": {"use_http_header": True, "http_header_name": ":authority"},
                }
            ],
        },
    }


class EnvoyPair(NodeProxyPair):
    name = "envoy"
    title = "Envoy HBONE pair"
    description = (
        "client pod -> Envoy (node1, explicit listener per destination) -> HBONE: HTTP/2 CONNECT over mTLS -> "
        "Envoy (node2:15008, ORIGINAL_DST by :authority) -> server pod; Envoy 1.40 --concurrency 1 each"
    )
    client_ports = (CLIENT_ECHO_PORT, CLIENT_IPERF_PORT)
    server_ports = (HBONE_PORT,)

    def _argv(self, role: str, config: dict[str, Any]) -> list[str]:
        path = self.work / f"envoy-{role}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [venv_tool("envoy"), "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]

    def client_argv(self, addrs: PairAddresses) -> list[str]:
        return self._argv("client", client_config(self.certs, addrs))

    def server_argv(self, addrs: PairAddresses) -> list[str]:
        return self._argv("server", server_config(self.certs, addrs))
