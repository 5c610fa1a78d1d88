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
