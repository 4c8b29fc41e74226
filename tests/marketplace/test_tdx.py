"""verify_tdx_quote against the real TDX quote and collateral in shared/testdata/tdx."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import datetime

import pytest

from protocol import attestation
from protocol.api import AttestationDoc
from protocol.attestation import (
    AttestationError,
    AttestationPolicy,
    VerifiedTdxQuote,
    check_td_report,
    verify_attestation,
    verify_tdx_quote,
)
from protocol.signed import TESTNET_GLOBAL_ID
from tests.shared_data import TDX_DIR, needs_tdx_sample

pytestmark = needs_tdx_sample

HEADER = 48
TD_ATTRIBUTES_OFFSET = HEADER + 16 + 48 + 48 + 8  # tee_tcb_svn, mr_seam, mr_signer_seam, seam_attr
MR_TD_OFFSET = TD_ATTRIBUTES_OFFSET + 8 + 8  # td_attributes, xfam
REPORT_DATA_OFFSET = HEADER + 584 - 64
BODY_END = HEADER + 584


def _pinned_now(collateral: dict) -> int:
    """One hour after the collateral's tcbInfo issue date."""
    issued = json.loads(collateral["tcb_info"])["issueDate"]
    return int(datetime.fromisoformat(issued.replace("Z", "+00:00")).timestamp()) + 3600


@pytest.fixture(scope="module")
def sample() -> tuple[bytes, dict, int]:
    assert TDX_DIR is not None
    quote = (TDX_DIR / "tdx_quote").read_bytes()
    collateral = json.loads((TDX_DIR / "tdx_quote_collateral.json").read_text())
    return quote, collateral, _pinned_now(collateral)


def _verify(quote: bytes, collateral: dict, now: int, **overrides):
    kwargs = dict(
        now=now,
        allowed_mr_td=frozenset({quote[MR_TD_OFFSET : MR_TD_OFFSET + 48]}),
        expected_report_data=quote[REPORT_DATA_OFFSET:BODY_END],
        accepted_tcb_statuses=frozenset({"UpToDate"}),
    )
    kwargs.update(overrides)
    return verify_tdx_quote(quote, collateral, **kwargs)


def test_layout_matches_the_readme(sample):
    quote, _, _ = sample
    assert quote[MR_TD_OFFSET:].hex().startswith("91eb2b44d141d4ec")
    assert quote[REPORT_DATA_OFFSET:].hex().startswith("9a9d48e7f6799642")
    assert quote[TD_ATTRIBUTES_OFFSET] & 1 == 0


def test_accepts_the_real_quote_with_now_pinned(sample):
    quote, collateral, now = sample
    result = _verify(quote, collateral, now)
    assert result.tcb_status == "UpToDate"
    assert result.mr_td == quote[MR_TD_OFFSET : MR_TD_OFFSET + 48]
    assert result.report_data == quote[REPORT_DATA_OFFSET:BODY_END]


@pytest.mark.parametrize(
    "position",
    [
        0,  # header: version
        10,  # header: QE svn / vendor id
        30,  # header: user data
        HEADER + 20,  # body: mr_seam
        MR_TD_OFFSET + 5,  # body: mr_td
        REPORT_DATA_OFFSET + 3,  # body: report_data
        BODY_END + 4 + 10,  # signature data: the ECDSA signature over header+body
        BODY_END + 4 + 64 + 10,  # signature data: the attestation key
        BODY_END + 4 + 128 + 100,  # signature data: the QE report
        1999,  # the PCK leaf certificate (PEM)
        3500,  # the PCK platform CA certificate
        4930,  # the root certificate's last base64 line
        4999,  # the zero padding after the signature data
        632,  # the signature-data length
        764,  # the certification-data type
        2000,  # a newline inside the PEM chain
    ],
)
def test_rejects_any_flipped_byte(sample, position):
    quote, collateral, now = sample
    tampered = bytearray(quote)
    tampered[position] ^= 0x01
    with pytest.raises(AttestationError) as info:
        _verify(bytes(tampered), collateral, now)
    # Refused by the parser, the signature chain or the padding check: never by policy.
    message = str(info.value)
    assert not any(p in message for p in ("allowlist", "report_data does not", "DEBUG"))


def test_rejects_a_flip_at_every_thirteenth_byte(sample):
    """dcap-qvl alone misses flips in the signature-data length, the certification type,
    PEM whitespace, the embedded root and the padding; verify_tdx_quote closes them all
    (an exhaustive scan of all 5,006 positions passes too; this samples for speed)."""
    quote, collateral, now = sample
    missed = []
    for position in range(0, len(quote), 13):
        tampered = bytearray(quote)
        tampered[position] ^= 0x01
        try:
            _verify(bytes(tampered), collateral, now)
        except AttestationError:
            continue
        missed.append(position)
    assert missed == []


def test_rejects_expired_collateral(sample):
    quote, collateral, _ = sample
    with pytest.raises(AttestationError, match="collateral is not valid"):
        _verify(quote, collateral, int(time.time()))


def test_rejects_mr_td_not_allowlisted(sample):
    quote, collateral, now = sample
    with pytest.raises(AttestationError, match="mr_td .* is not in the allowlist"):
        _verify(quote, collateral, now, allowed_mr_td=frozenset({bytes(48)}))


def test_rejects_report_data_mismatch(sample):
    quote, collateral, now = sample
    with pytest.raises(AttestationError, match="report_data does not match"):
        _verify(quote, collateral, now, expected_report_data=bytes(64))


def test_rejects_unaccepted_tcb_status(sample):
    quote, collateral, now = sample
    with pytest.raises(AttestationError, match="TCB status UpToDate is not accepted"):
        _verify(quote, collateral, now, accepted_tcb_statuses=frozenset({"OutOfDate"}))


def test_debug_bit_flipped_in_the_quote_is_rejected_by_the_signature(sample):
    """Setting DEBUG in the signed quote breaks the quote signature: dcap-qvl refuses."""
    quote, collateral, now = sample
    tampered = bytearray(quote)
    tampered[TD_ATTRIBUTES_OFFSET] |= 0x01
    with pytest.raises(AttestationError, match="signature or collateral does not verify"):
        _verify(bytes(tampered), collateral, now)


def test_debug_bit_in_a_verified_report_is_rejected_by_the_debug_check(sample):
    """A genuinely signed debug TD (the report of the real quote with bit 0 set)."""
    quote, collateral, now = sample
    good = _verify(quote, collateral, now)
    attrs = bytearray(good.td_attributes)
    attrs[0] |= 0x01
    debug = replace(good, td_attributes=bytes(attrs))
    assert isinstance(debug, VerifiedTdxQuote)
    with pytest.raises(AttestationError, match="DEBUG mode"):
        check_td_report(
            debug,
            allowed_mr_td=frozenset({good.mr_td}),
            expected_report_data=good.report_data,
            accepted_tcb_statuses={"UpToDate"},
        )


def test_rejects_garbage_and_bad_collateral(sample):
    quote, collateral, now = sample
    with pytest.raises(AttestationError, match="does not parse"):
        _verify(b"\x04\x00" + bytes(100), collateral, now)
    broken = dict(collateral, tcb_info_signature="00" * 64)
    with pytest.raises(AttestationError):
        _verify(quote, broken, now)
    with pytest.raises(AttestationError, match="collateral is malformed"):
        _verify(quote, {"nope": 1}, now)


def test_verify_attestation_tdx_kind_reaches_the_quote(sample, monkeypatch):
    """verify_attestation(kind="tdx") checks the quote against the doc's keys and nonce.

    The sample quote binds someone else's report_data, so with the doc's own keys it
    must fail on report_data, after the signature, TCB, debug and mr_td checks passed.
    """
    import base64

    quote, collateral, now = sample
    doc = AttestationDoc(
        kind="tdx",
        ed25519_public="11" * 32,
        x25519_public="22" * 32,
        nonce="33" * 32,
        evidence=base64.b64encode(quote).decode(),
        collateral=collateral,
        issued_at=now,
    )
    mr_td = quote[MR_TD_OFFSET : MR_TD_OFFSET + 48]
    policy = AttestationPolicy(allowed_measurements=frozenset({mr_td}), now=now)
    with pytest.raises(AttestationError, match="report_data does not match"):
        verify_attestation(doc, policy, expected_nonce=bytes.fromhex("33" * 32))
    # With the report data the quote really carries, the whole path accepts it.
    monkeypatch.setattr(attestation, "report_data", lambda *_: quote[REPORT_DATA_OFFSET:BODY_END])
    verified = verify_attestation(doc, policy)
    assert verified.kind == "tdx" and verified.measurement == mr_td
    with pytest.raises(AttestationError, match="no DCAP collateral"):
        verify_attestation(doc.model_copy(update={"collateral": None}), policy)


def test_an_mr_td_left_to_the_caller_passes_every_other_check(sample):
    """allowed_mr_td=None: the matcher checks the mr_td against the Registry itself."""
    quote, collateral, now = sample
    result = _verify(quote, collateral, now, allowed_mr_td=None)
    assert result.mr_td == quote[MR_TD_OFFSET : MR_TD_OFFSET + 48]
    with pytest.raises(AttestationError, match="report_data does not match"):
        _verify(quote, collateral, now, allowed_mr_td=None, expected_report_data=bytes(64))
    with pytest.raises(AttestationError, match="TCB status"):
        _verify(
            quote, collateral, now,
            allowed_mr_td=None, accepted_tcb_statuses=frozenset({"OutOfDate"}),
        )  # fmt: skip
    with pytest.raises(AttestationError, match="collateral is not valid"):
        _verify(quote, collateral, int(time.time()), allowed_mr_td=None)


async def test_with_a_registry_the_matcher_checks_the_mr_td_on_chain(
    sample, monkeypatch, session, start_matcher, start_node
):
    """No --allow-mr-td: the TD's image hash must be on the Registry's allowlist."""
    from protocol.attestation import image_hash
    from protocol.signed import model_hash
    from tests.marketplace.conftest import signed_registration
    from tests.marketplace.fakes import MODEL
    from tests.marketplace.test_allowlists import DEAD_CHAIN, REGISTRY, script_registry

    quote, collateral, now = sample
    mr_td = quote[MR_TD_OFFSET : MR_TD_OFFSET + 48]
    chain = script_registry(monkeypatch)
    chain.models.add(model_hash(MODEL))
    # The sample quote binds someone else's keys: let its report data stand for this node's.
    monkeypatch.setattr(attestation, "report_data", lambda *_: quote[REPORT_DATA_OFFSET:BODY_END])
    matcher = await start_matcher(
        devnet=False, chain_url=DEAD_CHAIN, registry=REGISTRY, global_id=TESTNET_GLOBAL_ID,
        attestation_now=now, allowlist_ttl_s=0,
    )  # fmt: skip
    assert matcher.registry.policy.allowed_measurements is None
    matcher.registry.providers = None  # the Provider check has its own tests
    node = await start_node(tdx_sample=(quote, collateral))

    async def register() -> tuple[int, dict]:
        async with session.post(f"{matcher.url}/v1/nodes", json=signed_registration(node)) as r:
            return r.status, await r.json()

    status, body = await register()
    assert status == 403 and body["error"]["code"] == "image_not_allowed"
    assert f"{image_hash(mr_td):064x}" in body["error"]["message"]
    chain.images.add(image_hash(mr_td))
    status, body = await register()
    assert status == 200 and body["attestation_kind"] == "tdx"
    assert body["measurement"] == mr_td.hex()
