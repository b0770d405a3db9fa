"""Server certificates for the emulated hub: given, or a throwaway trustme CA."""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass

import trustme


@dataclass(frozen=True)
class CertPair:
    cert_pem: bytes  # server certificate, followed by its chain
    key_pem: bytes
    ca_pem: bytes | None = None  # CA that clients should trust (published as hub.ca_pem)

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, ca_file: str | None = None) -> CertPair:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return cls(read(cert_file), read(key_file), read(ca_file) if ca_file else None)


class HubCertificates:
    """Owns the PEM files the TLS contexts load; they live in a private temp dir."""

    def __init__(
        self,
        hub_host: str,
        cert: CertPair | None,
        client_ca_pem: bytes | None,
        extra_names: tuple[str, ...] = (),
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="hubsim-")
        self.ca: trustme.CA | None = None
        if cert is None:
            self.ca = trustme.CA(organization_name="hubsim throwaway CA")
            names = [hub_host, "localhost", "127.0.0.1", "::1"]
            names += [n for n in extra_names if n not in names]
            leaf = self.ca.issue_cert(*names)
            cert = CertPair(
                b"".join(b.bytes() for b in leaf.cert_chain_pems),
                leaf.private_key_pem.bytes(),
                self.ca.cert_pem.bytes(),
            )
        self.cert_file = self._write("server.pem", cert.cert_pem)
        self.key_file = self._write("server.key", cert.key_pem)
        self.ca_pem = cert.ca_pem
        self.ca_file = self._write("ca.pem", cert.ca_pem) if cert.ca_pem else None
        # Client certificates (X.509 device identities) are checked against this CA.
        self.client_ca_pem = client_ca_pem or (self.ca.cert_pem.bytes() if self.ca else None)

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self._dir.name, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
        return path

    def server_context(self, require_client_cert: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_pem:
            ctx.load_verify_locations(cadata=self.client_ca_pem.decode())
            # Like the hub: ask for a client certificate, use it only if sent.
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def issue_device_cert(self, identity: str) -> tuple[bytes, bytes]:
        """A client certificate with CN = identity, signed by the throwaway CA."""
        if self.ca is None:
            raise RuntimeError("hubsim was given a certificate; it has no CA to issue from")
        # Device ids are not host names; the identity travels in the CN only.
        leaf = self.ca.issue_cert("device.hubsim.invalid", common_name=identity)
        return b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes()

    def cleanup(self) -> None:
        self._dir.cleanup()


def peer_common_name(ssl_object: ssl.SSLObject | None) -> str | None:
    """CN of a verified client certificate, if one was presented."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
