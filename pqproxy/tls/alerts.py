"""Alerts as exceptions: parsers and the state machine raise these, and
ServerConnection turns them into wire bytes in exactly one place."""

from __future__ import annotations

from .enums import AlertDescription


class TLSAlert(Exception):
    """A fatal alert the engine will send. ``reason`` is for logs only and
    never reaches the wire."""

    description: AlertDescription = AlertDescription.internal_error

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or self.description.name)
        self.reason = reason or self.description.name


class UnexpectedMessage(TLSAlert):
    description = AlertDescription.unexpected_message


class BadRecordMac(TLSAlert):
    description = AlertDescription.bad_record_mac


class RecordOverflow(TLSAlert):
    description = AlertDescription.record_overflow


class HandshakeFailure(TLSAlert):
    description = AlertDescription.handshake_failure


class BadCertificate(TLSAlert):
    description = AlertDescription.bad_certificate


class IllegalParameter(TLSAlert):
    description = AlertDescription.illegal_parameter


class DecodeError(TLSAlert):
    description = AlertDescription.decode_error


class DecryptError(TLSAlert):
    description = AlertDescription.decrypt_error


class ProtocolVersion(TLSAlert):
    description = AlertDescription.protocol_version


class InsufficientSecurity(TLSAlert):
    description = AlertDescription.insufficient_security


class InternalError(TLSAlert):
    description = AlertDescription.internal_error


class MissingExtension(TLSAlert):
    description = AlertDescription.missing_extension


class UnsupportedExtension(TLSAlert):
    description = AlertDescription.unsupported_extension


class UnrecognizedName(TLSAlert):
    description = AlertDescription.unrecognized_name


class NoApplicationProtocol(TLSAlert):
    description = AlertDescription.no_application_protocol


class UnsupportedCertificate(TLSAlert):
    description = AlertDescription.unsupported_certificate


class CertificateExpired(TLSAlert):
    description = AlertDescription.certificate_expired


class UnknownCA(TLSAlert):
    description = AlertDescription.unknown_ca


class CertificateRequired(TLSAlert):
    description = AlertDescription.certificate_required


_BY_NAME: dict[str, type[TLSAlert]] = {
    cls.description.name: cls
    for cls in (
        BadCertificate,
        UnsupportedCertificate,
        CertificateExpired,
        UnknownCA,
        DecryptError,
        IllegalParameter,
        HandshakeFailure,
    )
}


def alert_named(name: str, reason: str) -> TLSAlert:
    """The alert a certificate verifier asked for by name; an unknown name is a bug in
    the verifier and becomes bad_certificate rather than a crash."""
    return _BY_NAME.get(name, BadCertificate)(reason)
