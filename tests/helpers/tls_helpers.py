"""Throwaway PKI for TLS tests, made with `cryptography` into a directory: a CA, a server
certificate for localhost / 127.0.0.1 and a client certificate it signed, and an unrelated
second CA with its own server and client certificates (the "wrong" ones). EC P-256 keys:
generated in milliseconds, unlike RSA."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    """Paths of PEM files (str, as the server flags and client arguments take them)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    wrong_ca: str
    wrong_server_cert: str
    wrong_server_key: str
    wrong_client_cert: str
    wrong_client_key: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate | None) -> str:
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    else:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey]
                 | None, usage: str) -> x509.Certificate:
    """usage: "ca", "server" (SAN localhost + 127.0.0.1) or "client"."""
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=usage == "ca", path_length=None), critical=True))
    if usage == "ca":
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    elif usage == "server":
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _authority(directory: Path, prefix: str, label: str) -> dict[str, str]:
    """A CA and a server and a client certificate it signed, written under `directory`."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(f"{label} CA", ca_key, None, "ca")
    out = {f"{prefix}ca": _write(directory / f"{prefix}ca.pem", None, ca)}
    for usage in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"{label} {usage}", key, (ca.subject, ca_key), usage)
        out[f"{prefix}{usage}_cert"] = _write(directory / f"{prefix}{usage}.pem", None, cert)
        out[f"{prefix}{usage}_key"] = _write(directory / f"{prefix}{usage}.key", key, None)
    return out


def make_pki(directory: Path) -> Pki:
    """Write a fresh PKI into `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    return Pki(**_authority(directory, "", "loraserve test"), **_authority(directory, "wrong_", "unrelated"))
