"""ML-DSA private keys in PKCS#8: the three forms of RFC 9881 §6 and which of them load.

    ML-DSA-PrivateKey ::= CHOICE {
      seed        [0] IMPLICIT OCTET STRING (SIZE (32)),
      expandedKey OCTET STRING (SIZE (2560 | 4032 | 4896)),
      both        SEQUENCE { seed OCTET STRING (SIZE (32)),
                             expandedKey OCTET STRING (SIZE (2560 | 4032 | 4896)) } }

cryptography reads the seed form only. OpenSSL 3.5 and later write the ``both`` form by
default (``openssl genpkey -algorithm ML-DSA-65``), so that one is loaded here from its seed,
after checking that its expanded key is the one the seed gives (FIPS 204 Algorithm 6,
ML-DSA.KeyGen_internal, and Algorithm 24, skEncode): a file whose two halves disagree is
damaged or forged, and OpenSSL refuses it too. The ``expandedKey`` form has no seed and
cryptography cannot sign from an expanded key, so it is refused with what to do instead.

The derivation below is the reference algorithm in plain Python: it runs once per key at
start-up (tens of milliseconds) and signs nothing; cryptography does all the signing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from . import der

_Q: Final = 8380417
_D: Final = 13
_N: Final = 256
_ZETA: Final = 1753
_SEED_SIZE: Final = 32


@dataclass(frozen=True)
class ParameterSet:
    name: str
    oid: str
    k: int
    l: int  # noqa: E741 (FIPS 204's name)
    eta: int

    @property
    def expanded_key_size(self) -> int:
        eta_bits = 3 if self.eta == 2 else 4
        return 128 + 32 * eta_bits * (self.k + self.l) + 32 * _D * self.k


PARAMETER_SETS: Final[dict[str, ParameterSet]] = {
    p.oid: p
    for p in (
        ParameterSet("ML-DSA-44", "2.16.840.1.101.3.4.3.17", k=4, l=4, eta=2),
        ParameterSet("ML-DSA-65", "2.16.840.1.101.3.4.3.18", k=6, l=5, eta=4),
        ParameterSet("ML-DSA-87", "2.16.840.1.101.3.4.3.19", k=8, l=7, eta=2),
    )
}

# What to tell an operator whose key cannot be loaded. `-provparam` is OpenSSL 3.6's and
# later; on 3.5 set `output_formats = seed-only` in the ml-dsa section of openssl.cnf.
CONVERT_HINT: Final = (
    "write it in the seed form, e.g. `openssl pkey -provparam "
    "ml-dsa.output_formats=seed-only -in KEY.pem -out KEY-seed.pem` (OpenSSL 3.6+)"
)


class MlDsaKeyError(ValueError):
    """An ML-DSA PKCS#8 key that cannot be loaded; the message names the form and why."""


@dataclass(frozen=True)
class MlDsaPkcs8:
    """An ML-DSA PrivateKeyInfo taken apart: the parameter set and which CHOICE it holds."""

    parameters: ParameterSet
    form: str  # "seed", "expandedKey" or "both"
    seed: bytes | None
    expanded_key: bytes | None


def parse_pkcs8(pkcs8: bytes) -> MlDsaPkcs8 | None:
    """The ML-DSA key inside a PrivateKeyInfo (RFC 5958 §2); None when ``pkcs8`` is not an
    ML-DSA PrivateKeyInfo at all (another algorithm, or not DER we can read), so the caller
    hands it to the library as it is. Raises MlDsaKeyError for an ML-DSA key whose
    private-key field is none of the three forms."""
    try:
        info = der.children(der.read_one(pkcs8, der.SEQUENCE).value)
        if len(info) < 3 or info[1].tag != der.SEQUENCE or info[2].tag != der.OCTET_STRING:
            return None
        algorithm = der.children(info[1].value)
        if not algorithm or algorithm[0].tag != der.OID:
            return None
        parameters = PARAMETER_SETS.get(der.decode_oid(algorithm[0].value))
    except der.DerError:
        return None
    if parameters is None:
        return None
    name = parameters.name
    try:
        key = der.read_one(info[2].value, der.read(info[2].value)[0].tag)
    except der.DerError as exc:
        raise MlDsaKeyError(f"{name} private key: not an ML-DSA-PrivateKey ({exc})") from None
    if key.tag == der.context(0, constructed=False):
        return MlDsaPkcs8(parameters, "seed", _seed(name, key.value), None)
    if key.tag == der.OCTET_STRING:
        return MlDsaPkcs8(parameters, "expandedKey", None, _expanded(parameters, key.value))
    if key.tag == der.SEQUENCE:
        try:
            parts = der.children(key.value)
        except der.DerError as exc:
            raise MlDsaKeyError(f"{name} private key (seed and expanded key): {exc}") from None
        if len(parts) != 2 or any(p.tag != der.OCTET_STRING for p in parts):
            raise MlDsaKeyError(
                f"{name} private key: the 'both' form must hold two OCTET STRINGs "
                "(seed, expandedKey)"
            )
        return MlDsaPkcs8(
            parameters,
            "both",
            _seed(name, parts[0].value),
            _expanded(parameters, parts[1].value),
        )
    raise MlDsaKeyError(
        f"{name} private key: unknown ML-DSA-PrivateKey form (tag 0x{key.tag:02x}); "
        "expected seed, expandedKey or both (RFC 9881 §6)"
    )


def _seed(name: str, value: bytes) -> bytes:
    if len(value) != _SEED_SIZE:
        raise MlDsaKeyError(f"{name} private key: seed of {len(value)} bytes, not 32")
    return value


def _expanded(parameters: ParameterSet, value: bytes) -> bytes:
    if len(value) != parameters.expanded_key_size:
        raise MlDsaKeyError(
            f"{parameters.name} private key: expanded key of {len(value)} bytes, not "
            f"{parameters.expanded_key_size}"
        )
    return value


def seed_pkcs8(parameters: ParameterSet, seed: bytes) -> bytes:
    """The seed-only PrivateKeyInfo of the same key: the form cryptography loads."""
    return der.sequence(
        der.encode_integer(0),
        der.sequence(der.encode_oid(parameters.oid)),
        der.encode(der.OCTET_STRING, der.encode(der.context(0, constructed=False), seed)),
    )


def check_expanded_key(parameters: ParameterSet, seed: bytes, expanded_key: bytes) -> None:
    """Raise MlDsaKeyError unless ``expanded_key`` is what ``seed`` derives (constant-time
    compare: the expanded key is secret)."""
    if not hmac.compare_digest(expanded_key_from_seed(parameters, seed), expanded_key):
        raise MlDsaKeyError(
            f"{parameters.name} private key (seed and expanded key): the expanded key does "
            "not match the one the seed derives (FIPS 204 KeyGen_internal); the file is "
            "damaged or its halves come from different keys"
        )


# -- FIPS 204 key generation from the seed -----------------------------------------------------


def _bit_reverse8(value: int) -> int:
    return int(f"{value:08b}"[::-1], 2)


_ZETAS: Final[tuple[int, ...]] = tuple(pow(_ZETA, _bit_reverse8(m), _Q) for m in range(256))
_N_INVERSE: Final = pow(256, -1, _Q)  # 8347681, FIPS 204 Algorithm 42's f


def _ntt(poly: list[int]) -> list[int]:
    """FIPS 204 Algorithm 41."""
    w = [c % _Q for c in poly]
    m = 0
    length = 128
    while length >= 1:
        for start in range(0, _N, 2 * length):
            m += 1
            z = _ZETAS[m]
            for j in range(start, start + length):
                t = z * w[j + length] % _Q
                w[j + length] = (w[j] - t) % _Q
                w[j] = (w[j] + t) % _Q
        length //= 2
    return w


def _inverse_ntt(w_hat: list[int]) -> list[int]:
    """FIPS 204 Algorithm 42."""
    w = list(w_hat)
    m = 256
    length = 1
    while length < _N:
        for start in range(0, _N, 2 * length):
            m -= 1
            z = -_ZETAS[m]
            for j in range(start, start + length):
                t = w[j]
                w[j] = (t + w[j + length]) % _Q
                w[j + length] = z * (t - w[j + length]) % _Q
        length *= 2
    return [c * _N_INVERSE % _Q for c in w]


def _rej_ntt_poly(seed: bytes) -> list[int]:
    """FIPS 204 Algorithm 30 (RejNTTPoly) with Algorithm 14 (CoeffFromThreeBytes)."""
    coefficients: list[int] = []
    size = 3 * 280
    while True:
        stream = hashlib.shake_128(seed).digest(size)
        coefficients.clear()
        for i in range(0, size - 2, 3):
            z = stream[i] | stream[i + 1] << 8 | (stream[i + 2] & 0x7F) << 16
            if z < _Q:
                coefficients.append(z)
                if len(coefficients) == _N:
                    return coefficients
        size *= 2  # rare: read a longer prefix of the same stream


def _coefficient_from_half_byte(b: int, eta: int) -> int | None:
    """FIPS 204 Algorithm 15."""
    if eta == 2 and b < 15:
        return 2 - b % 5
    if eta == 4 and b < 9:
        return 4 - b
    return None


def _rej_bounded_poly(seed: bytes, eta: int) -> list[int]:
    """FIPS 204 Algorithm 31."""
    coefficients: list[int] = []
    size = 256
    while True:
        stream = hashlib.shake_256(seed).digest(size)
        coefficients.clear()
        for byte in stream:
            for half in (byte & 0x0F, byte >> 4):
                value = _coefficient_from_half_byte(half, eta)
                if value is not None:
                    coefficients.append(value)
                    if len(coefficients) == _N:
                        return coefficients
        size *= 2


def _pack(values: list[int], bits: int) -> bytes:
    """FIPS 204 Algorithms 16/17 (SimpleBitPack / BitPack of already-offset values):
    little-endian bit order, ``bits`` bits per value."""
    accumulator = 0
    for index, value in enumerate(values):
        accumulator |= value << (index * bits)
    return accumulator.to_bytes(len(values) * bits // 8, "little")


def expanded_key_from_seed(parameters: ParameterSet, seed: bytes) -> bytes:
    """sk of FIPS 204 ML-DSA.KeyGen_internal(ξ=seed) (Algorithms 6 and 24)."""
    k, l, eta = parameters.k, parameters.l, parameters.eta  # noqa: E741
    expanded = hashlib.shake_256(seed + bytes((k, l))).digest(128)
    rho, rho_prime, key = expanded[:32], expanded[32:96], expanded[96:]
    # ExpandS (Algorithm 33): s1 from counters 0..l-1, s2 from l..l+k-1.
    s1 = [_rej_bounded_poly(rho_prime + r.to_bytes(2, "little"), eta) for r in range(l)]
    s2 = [_rej_bounded_poly(rho_prime + (l + r).to_bytes(2, "little"), eta) for r in range(k)]
    s1_hat = [_ntt(p) for p in s1]
    t1: list[int] = []
    t0: list[int] = []
    half = 1 << (_D - 1)
    for r in range(k):
        # ExpandA (Algorithm 32): Â[r][s] from ρ ‖ s ‖ r.
        row = [_rej_ntt_poly(rho + bytes((s, r))) for s in range(l)]
        accumulator = [0] * _N
        for a_hat, s_hat in zip(row, s1_hat, strict=True):
            for j in range(_N):
                accumulator[j] += a_hat[j] * s_hat[j]
        t = _inverse_ntt([c % _Q for c in accumulator])
        for j in range(_N):
            value = (t[j] + s2[r][j]) % _Q
            # Power2Round (Algorithm 35): value = t1·2^d + t0, t0 in (-2^(d-1), 2^(d-1)].
            low = value & ((1 << _D) - 1)
            if low > half:
                low -= 1 << _D
            t1.append((value - low) >> _D)
            t0.append(low)
    public_key = rho + _pack(t1, 10)  # pkEncode (Algorithm 22)
    tr = hashlib.shake_256(public_key).digest(64)
    eta_bits = 3 if eta == 2 else 4
    return b"".join(
        (
            rho,
            key,
            tr,
            b"".join(_pack([eta - c for c in poly], eta_bits) for poly in s1),
            b"".join(_pack([eta - c for c in poly], eta_bits) for poly in s2),
            _pack([half - c for c in t0], _D),
        )
    )
