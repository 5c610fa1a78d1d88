"""Start-up self-tests: the known answers are the published ones, and a backend or a key that
computes something else is caught and named (a mismatch refuses start-up)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

import pytest

from pqproxy.crypto import selftest
from pqproxy.crypto.backends import liboqs, openssl
from pqproxy.crypto.certs import load_certified_key
from pqproxy.crypto.provider import (
    CertifiedKey,
    ClientKeyExchange,
    KxGroup,
    SharedSecret,
)
from pqproxy.crypto.selftest import (
    ACCUMULATED_768,
    SelfTestError,
    accumulated_mlkem768,
    check_signers,
    cross_check,
    run_startup_self_tests,
    self_test_backend,
)
from tests.conftest import DevCertFactory


def _require_liboqs() -> None:
    # As tests/backends/conftest.py: with liboqs-python installed, `make test` builds liboqs,
    # so an unavailable backend is a broken environment, not a skip.
    if liboqs.is_available():
        return
    if importlib.util.find_spec("oqs") is not None:
        pytest.fail(f"liboqs unavailable: {liboqs.unavailable_reason()}", pytrace=False)
    pytest.skip(f"liboqs unavailable: {liboqs.unavailable_reason()}")


def test_liboqs_reproduces_the_published_accumulated_vectors() -> None:
    _require_liboqs()
    assert ACCUMULATED_768 == "1114b1b6699ed191734fa339376afa7e285c9e6acf6ff0177d346696ce564415"
    assert accumulated_mlkem768() == ACCUMULATED_768
    # The digest depends on every iteration: a shorter run gives another one.
    assert accumulated_mlkem768(iterations=99) != ACCUMULATED_768


def test_liboqs_report_names_the_known_answers() -> None:
    _require_liboqs()
    report = self_test_backend("liboqs")
    assert report.ok, report.summary()
    names = {check.name: check for check in report.checks}
    assert names["FIPS 203 known answers"].ok is True
    assert "100 accumulated vectors" in names["FIPS 203 known answers"].detail
    assert names["cross-check X25519MLKEM768: liboqs serves, openssl client"].ok is True
    assert names["cross-check X25519MLKEM768: openssl serves, liboqs client"].ok is True
    # Its classical groups are openssl's own: nothing independent to cross-check.
    assert not any("x25519:" in name for name in names)
    assert report.method.startswith("FIPS 203 known answers + cross-check")


def test_a_wrong_known_answer_fails_the_liboqs_self_test(monkeypatch: pytest.MonkeyPatch) -> None:
    _require_liboqs()
    monkeypatch.setattr(selftest, "ACCUMULATED_768", "00" * 32)
    report = self_test_backend("liboqs")
    assert not report.ok
    (failed,) = report.failures
    assert failed.name == "FIPS 203 known answers"
    assert "accumulated vectors give 1114b1b6699ed191" in failed.detail
    with pytest.raises(SelfTestError, match="liboqs: FIPS 203 known answers"):
        run_startup_self_tests(["liboqs"])


def test_openssl_self_test_skips_known_answers_with_the_reason() -> None:
    report = self_test_backend("openssl")
    assert report.ok, report.summary()
    fips = next(check for check in report.checks if check.name == "FIPS 203 known answers")
    assert fips.ok is None and "no fixed randomness" in fips.detail


class LyingGroup:
    """A group that answers with a share of the right length but a secret of its own."""

    def __init__(self, inner: KxGroup) -> None:
        self._inner = inner
        self.group = inner.group
        self.backend = "liar"
        self.client_share_length = inner.client_share_length
        self.server_share_length = inner.server_share_length

    def server_exchange(self, client_share: bytes) -> tuple[bytes, SharedSecret]:
        share, secret = self._inner.server_exchange(client_share)
        return share, SharedSecret(bytes(len(secret)))

    def start(self) -> ClientKeyExchange:
        return self._inner.start()


class Provider:
    def __init__(self, groups: Mapping[int, KxGroup]) -> None:
        self.name = "liar"
        self.groups = groups


def test_cross_check_catches_a_wrong_secret() -> None:
    reference = openssl.OpenSSLProvider()
    x25519 = openssl.classical_groups()["x25519"]
    checks = cross_check("liar", Provider({x25519.group: LyingGroup(x25519)}), "openssl", reference)
    by_name = {check.name: check for check in checks}
    served = by_name["cross-check x25519: liar serves, openssl client"]
    assert served.ok is False
    assert "the two sides derive different secrets" in served.detail
    # Its client role is honest: that direction passes.
    assert by_name["cross-check x25519: openssl serves, liar client"].ok is True


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa2048", "ed25519", "mldsa44"])
def test_every_signing_key_signs_and_verifies(
    dev_certs_factory: DevCertFactory, key_type: str
) -> None:
    certs = dev_certs_factory(key_type)
    certified = load_certified_key(certs.cert, certs.key)
    checks = check_signers([certified])
    assert len(checks) == len(certified.signer.schemes)
    assert all(check.ok for check in checks), checks


def test_a_key_that_does_not_match_its_certificate_refuses_start_up(
    dev_certs_factory: DevCertFactory,
) -> None:
    p256, p384 = dev_certs_factory("ecdsa-p256"), dev_certs_factory("ecdsa-p384")
    first = load_certified_key(p256.cert, p256.key)
    other = load_certified_key(p384.cert, p384.key)
    mismatched = CertifiedKey(first.chain, other.signer)
    with pytest.raises(SelfTestError) as error:
        run_startup_self_tests(["openssl"], [first, mismatched])
    message = str(error.value)
    assert message.startswith("self-test failed: signing keys: signature ecdsa_secp384r1_sha384")
    assert "scheme 0x0503 does not fit a ecdsa-p256 key" in message
    reports = run_startup_self_tests(["openssl"], [first])
    assert [r.backend for r in reports] == ["openssl", "signing keys"]
    assert all(r.ok for r in reports)


def test_an_unavailable_backend_fails_the_start_up_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PQPROXY_PKCS11_MODULE", "PQPROXY_PKCS11_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SelfTestError, match="pkcs11: available: no PKCS#11 module configured"):
        run_startup_self_tests(["pkcs11"])
