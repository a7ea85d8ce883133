"""Keep the CA in a Kubernetes Secret so that every controller replica signs with the same root.

The Secret uses Istio's keys (``ca-cert.pem``, ``ca-key.pem``, ``cert-chain.pem``, ``root-cert.pem``), so both
istiod's self-signed ``istio-system/istio-ca-secret`` and a plugged-in ``istio-system/cacerts`` work unchanged.
It is mirrored into the controller's ``--ca-dir`` (an emptyDir), which :class:`controller.ca.CertificateAuthority`
reads and re-reads; editing the Secret (a rotation step) therefore reaches every replica at its next sync. An edit
that does not form a consistent CA is neither mirrored nor published: the last good copy stays.

On first start, when the Secret does not exist, a replica creates it from a fresh root; if another replica wins
that race (409 Conflict) its Secret is used instead, so all replicas converge on one root.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import urllib3

from common.files import write_atomic
from common.log import kv
from common.pki import cert_pem
from controller.ca import (
    CA_CERT,
    CA_FILES,
    CA_KEY,
    ROOT_CERT,
    CaError,
    CaLoadError,
    CaMaterial,
    check_material,
    key_pem,
    new_root,
)

log = logging.getLogger("ambit.ca_secret")


class CaSecretError(CaError):
    """The Secret cannot be read, created or used; names the Secret and the reason."""


def parse_secret_ref(ref: str, flag: str = "--ca-secret") -> tuple[str, str]:
    namespace, sep, name = ref.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise CaSecretError(f"{flag} {ref!r}: expected NAMESPACE/NAME")
    return namespace, name


def _fresh_root_data(trust_domain: str) -> dict[str, str]:
    cert, key = new_root(trust_domain)
    pem = cert_pem(cert).encode()
    return {
        CA_CERT: base64.b64encode(pem).decode(),
        CA_KEY: base64.b64encode(key_pem(key)).decode(),
        ROOT_CERT: base64.b64encode(pem).decode(),
    }


class CaSecret:
    """Mirrors Secret ``namespace/name`` into ``directory`` (blocking calls: run them off the event loop)."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        name: str,
        directory: Path | str,
        trust_domain: str,
        *,
        root_configmap: tuple[str, str] | None = None,
    ) -> None:
        """``root_configmap`` (namespace, name): also publish the trust bundle there as ``root-cert.pem``, for the
        agents' ``--root-cert`` (Istio's ``istio-ca-root-cert`` ConfigMap plays this part)."""
        from kubernetes import client as k8s

        self._k8s = k8s
        self._core = k8s.CoreV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.directory = Path(directory)
        self.trust_domain = trust_domain
        self.root_configmap = root_configmap
        self._published: str | None = None
        # The ConfigMap is written when the bundle changes, and re-asserted every this many syncs (5 minutes at the
        # default interval): deleted, or overwritten by a replica that had not yet seen a rotation step, it would
        # otherwise stay so until the next change. An unchanged write is a no-op for the API server.
        self.republish_every = 10
        self._syncs = 0

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def _read(self) -> dict[str, str] | None:
        try:
            secret = self._core.read_namespaced_secret(self.name, self.namespace)
        except self._k8s.ApiException as e:
            if e.status == 404:
                return None
            raise CaSecretError(f"secret {self.ref}: read failed: HTTP {e.status} {e.reason}") from None
        except urllib3.exceptions.HTTPError as e:
            raise CaSecretError(f"secret {self.ref}: API server unreachable: {e}") from None
        return dict(secret.data or {})

    def _create(self, data: dict[str, str]) -> dict[str, str]:
        k8s = self._k8s
        body = k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace, labels={"app": "ambit-controller"}),
            type="Opaque",
            data=data,
        )
        try:
            self._core.create_namespaced_secret(self.namespace, body)
        except urllib3.exceptions.HTTPError as e:
            raise CaSecretError(f"secret {self.ref}: API server unreachable: {e}") from None
        except k8s.ApiException as e:
            if e.status != 409:
                raise CaSecretError(f"secret {self.ref}: create failed: HTTP {e.status} {e.reason}") from None
            won = self._read()  # another replica created it first: use theirs
            if won is None:
                raise CaSecretError(f"secret {self.ref}: conflict on create but not readable") from None
            log.info("CA secret created by another replica; using it", extra=kv(secret=self.ref))
            return won
        log.info("created CA secret with a new self-signed root", extra=kv(secret=self.ref))
        return data

    def _mirror(self, data: dict[str, str]) -> tuple[bool, CaMaterial]:
        """Write the Secret's files into the directory; True when anything changed, and the CA they form.

        Every value is decoded and the whole checked as a CA before any file is touched: a Secret with one bad
        value, or values that form no CA (a key not matching the certificate, a bundle without the root the chain
        ends in), must leave the directory as the last good Secret made it. The running CA would refuse such a
        directory anyway, but a restarted replica would fail to start on it.
        """
        contents: dict[str, bytes] = {}
        for key in CA_FILES:
            if key in data:
                try:
                    contents[key] = base64.b64decode(data[key], validate=True)
                except ValueError:
                    raise CaSecretError(f"secret {self.ref}: data[{key}] is not base64") from None
        try:
            material = check_material(contents, lambda key: f"data[{key}]")
        except CaLoadError as e:
            raise CaSecretError(f"secret {self.ref}: {e}") from None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        changed = False
        for key in CA_FILES:
            path = self.directory / key
            if key not in contents:
                if path.exists():
                    path.unlink()
                    changed = True
            elif not path.exists() or path.read_bytes() != contents[key]:
                write_atomic(path, contents[key], 0o600 if key == CA_KEY else 0o644)
                changed = True
        return changed, material

    def _publish_roots(self, material: CaMaterial) -> None:
        """The bundle of the CA just checked, never raw Secret text: agents started from the ConfigMap trust only
        it, so a bundle that does not hold the root the controller's serving chain ends in would lock them out."""
        if self.root_configmap is None:
            return
        roots = "".join(cert_pem(r) for r in material.roots)
        if roots == self._published:
            return
        k8s = self._k8s
        namespace, name = self.root_configmap
        body = k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels={"app": "ambit-controller"}),
            data={ROOT_CERT: roots},
        )
        try:
            try:
                self._core.replace_namespaced_config_map(name, namespace, body)
            except k8s.ApiException as e:
                if e.status != 404:
                    raise
                self._core.create_namespaced_config_map(namespace, body)
        except k8s.ApiException as e:
            raise CaSecretError(f"configmap {namespace}/{name}: publish failed: HTTP {e.status} {e.reason}") from None
        except urllib3.exceptions.HTTPError as e:
            raise CaSecretError(f"configmap {namespace}/{name}: API server unreachable: {e}") from None
        self._published = roots
        log.info("trust bundle published", extra=kv(configmap=f"{namespace}/{name}"))

    def sync(self) -> bool:
        """Read (creating on first start), mirror and publish the roots; True when the directory changed."""
        data = self._read()
        if data is None:
            data = self._create(_fresh_root_data(self.trust_domain))
        if CA_CERT not in data or CA_KEY not in data:
            raise CaSecretError(f"secret {self.ref}: needs data keys {CA_CERT} and {CA_KEY}")
        changed, material = self._mirror(data)
        self._syncs += 1
        if self._syncs % self.republish_every == 0:
            self._published = None
        self._publish_roots(material)
        return changed

    async def run(self, interval: float = 30.0) -> None:
        """Re-sync periodically so Secret edits (rotation steps) reach this replica; errors keep the last copy."""
        while True:
            await asyncio.sleep(interval)
            try:
                if await asyncio.to_thread(self.sync):
                    log.info("CA secret changed; mirrored", extra=kv(secret=self.ref))
            except (CaSecretError, OSError) as e:
                log.error("CA secret sync failed; keeping the last copy", extra=kv(error=str(e)))
