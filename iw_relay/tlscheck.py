"""Certificates without a subjectAltName, found at start rather than at a client's
handshake.

Browsers match a server's name against the certificate's subjectAltName only (the
subject's CN is ignored), and Twisted's ``tls:`` endpoint picks a directory's certificate
for a client by its subjectAltName DNS names, not by the file's name: a CN-only
certificate there is never served, and the client sees a bare handshake failure.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography import x509

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _arguments(description: str) -> tuple[list[str], dict[str, str]]:
    """An endpoint string's positional and key=value arguments (``\\:`` escapes a colon)."""
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", description)]
    positional = [p for p in parts[1:] if "=" not in p]
    named = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return positional, named


def _dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*names.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in names.get_values_for_type(x509.IPAddress))]


def _is_authority(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(
            x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _server_certificates(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM file that are not certificate authorities."""
    try:
        data = path.read_bytes()
    except OSError:
        return []  # the endpoint's own parsing reports unreadable files
    found = []
    for block in _PEM_CERTIFICATE.findall(data):
        try:
            certificate = x509.load_pem_x509_certificate(block)
        except ValueError:
            continue
        if not _is_authority(certificate):
            found.append(certificate)
    return found


def certificates_without_san(description: str) -> list[str]:
    """One sentence per certificate of an ``ssl:`` or ``tls:`` endpoint that has no
    subjectAltName; nothing for other endpoints."""
    kind = description.split(":", 1)[0]
    positional, named = _arguments(description)
    if kind == "ssl":
        certificate_file = named.get("certKey") or named.get("privateKey")
        if not certificate_file:
            return []
        found = _server_certificates(Path(certificate_file))[:1]
        return [f"the certificate in {certificate_file} has no subjectAltName: browsers "
                "and most clients refuse it; issue it with the server's name as a "
                "subjectAltName" for certificate in found if not _dns_names(certificate)]
    if kind == "tls" and positional:
        directory = Path(positional[0])
        if not directory.is_dir():
            return []
        problems = []
        for path in sorted(directory.glob("*.pem")):
            certificates = _server_certificates(path)
            if certificates and not any(_dns_names(c) for c in certificates):
                problems.append(
                    f"the certificate in {path} has no subjectAltName: the tls: port picks "
                    "a certificate by its subjectAltName, not by the file's name, so it "
                    "never serves this one (clients see a handshake failure)")
        return problems
    return []
