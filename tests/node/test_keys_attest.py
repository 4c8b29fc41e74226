"""Keystore and attestation providers."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from node.app import NodeConfig, create_app
from node.attest import (
    AttestationUnavailable,
    Attester,
    DevEvidenceProvider,
    TdxEvidenceProvider,
    make_provider,
)
from node.keys import (
    NodeKeys,
    load_or_create_keys,
    node_public_key,
    record_provider,
    recorded_provider,
)
from protocol.api import AttestationDoc
from protocol.attestation import (
    AttestationError,
    AttestationPolicy,
    report_data,
    verify_attestation,
)
from protocol.keystore import KeystoreError
from tests.shared_data import TDX_DIR, needs_tdx_sample


def test_keystore_plain_is_0600_and_reloads(tmp_path):
    path = tmp_path / "keys.json"
    keys = load_or_create_keys(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_keys(path)
    assert again.ed25519_public == keys.ed25519_public
    assert again.x25519_public == keys.x25519_public
    assert keys.ed25519.private_bytes_raw().hex() not in repr(keys)


def test_keystore_encrypted_roundtrip_and_wrong_passphrase(tmp_path):
    path = tmp_path / "keys.json"
    keys = load_or_create_keys(path, "correct horse")
    raw = path.read_text()
    doc = json.loads(raw)
    assert "secret" not in doc and doc["crypto"]["kdf"] == "scrypt"
    secret = keys.ed25519.private_bytes_raw().hex()
    assert secret not in raw
    assert load_or_create_keys(path, "correct horse").node_id == keys.node_id
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        load_or_create_keys(path, "battery staple")
    with pytest.raises(KeystoreError, match="encrypted"):
        load_or_create_keys(path)


def test_keystore_refuses_loose_permissions(tmp_path):
    path = tmp_path / "keys.json"
    load_or_create_keys(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeystoreError, match="0600"):
        load_or_create_keys(path)


async def test_dev_attestation_verifies_with_devnet_policy():
    keys = NodeKeys.generate()
    attester = Attester(keys, make_provider("dev", keys, devnet=True))
    nonce = os.urandom(32)
    doc = await attester.attest(nonce)
    verified = verify_attestation(doc, AttestationPolicy(allow_dev=True), expected_nonce=nonce)
    assert verified.ed25519_public == keys.ed25519_public
    assert verified.x25519_public == keys.x25519_public
    with pytest.raises(AttestationError):
        verify_attestation(doc, AttestationPolicy(allow_dev=False))
    with pytest.raises(AttestationError):
        verify_attestation(doc, AttestationPolicy(allow_dev=True), expected_nonce=os.urandom(32))


def test_dev_attestation_refused_without_devnet(tmp_path):
    keys = NodeKeys.generate()
    with pytest.raises(AttestationUnavailable, match="devnet"):
        make_provider("dev", keys, devnet=False)
    with pytest.raises(AttestationUnavailable, match="devnet"):
        create_app(NodeConfig(state_dir=tmp_path, attestation="dev", upstream="http://x"))
    assert isinstance(make_provider("dev", keys, devnet=True), DevEvidenceProvider)


def test_tdx_gives_a_clear_error_without_configfs_tsm(tmp_path):
    provider = TdxEvidenceProvider(root=tmp_path / "no" / "tsm" / "report")
    with pytest.raises(AttestationUnavailable, match="configfs-tsm"):
        provider.check()
    with pytest.raises(AttestationUnavailable, match="configfs-tsm"):
        provider.evidence(bytes(64))
    if not os.path.isdir("/sys/kernel/config/tsm/report"):
        # This host is no TDX guest: the node refuses to start with tdx (the default).
        with pytest.raises(AttestationUnavailable, match="configfs-tsm"):
            create_app(NodeConfig(state_dir=tmp_path / "n", upstream="http://x"))


async def test_attest_endpoint(node):
    nonce = os.urandom(32)
    async with node.session.post(node.url + "/v1/attest", json={"nonce": nonce.hex()}) as r:
        assert r.status == 200
        doc = AttestationDoc.model_validate(await r.json())
    verify_attestation(doc, AttestationPolicy(allow_dev=True), expected_nonce=nonce)
    async with node.session.post(node.url + "/v1/attest", json={"nonce": "zz"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "invalid_nonce"


async def test_identity_status_health(node):
    async with node.session.get(node.url + "/v1/identity") as r:
        ident = await r.json()
    assert ident["ed25519_public"] == node.keys.node_id
    assert ident["x25519_public"] == node.keys.x25519_public.hex()
    assert ident["attestation_kind"] == "dev"
    async with node.session.get(node.url + "/v1/status") as r:
        status = await r.json()
    assert status["models"] == [
        {
            "id": "fixture-model",
            "price_prompt": 20_000_000,
            "price_completion": 60_000_000,
            "max_model_len": 2048,
        }
    ]
    assert status["healthy"] is True and status["active_jobs"] == 0
    assert status["max_concurrent"] == 64 and "CPU" in status["hardware"]
    assert "openai-compatible" in status["engine"]
    async with node.session.get(node.url + "/health") as r:
        assert r.status == 200


class _SampleQuoteProvider:
    """FIXTURE: stands in for configfs-tsm by returning a real (foreign) TDX quote."""

    kind = "tdx"

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def check(self) -> None:
        return None

    def evidence(self, data: bytes) -> bytes:
        self.requests.append(data)
        return (TDX_DIR / "tdx_quote").read_bytes()


@needs_tdx_sample
async def test_tdx_doc_carries_cached_collateral_that_verifies():
    keys = NodeKeys.generate()
    collateral = json.loads((TDX_DIR / "tdx_quote_collateral.json").read_text())
    fetches = []

    async def fetch(quote: bytes) -> dict:
        fetches.append(quote)
        return collateral

    provider = _SampleQuoteProvider()
    attester = Attester(keys, provider, collateral_fetcher=fetch)
    nonce = os.urandom(32)
    doc = await attester.attest(nonce)
    await attester.attest(os.urandom(32))
    assert len(fetches) == 1  # the platform's collateral is cached
    assert provider.requests[0] == report_data(keys.ed25519_public, keys.x25519_public, nonce)
    assert doc.kind == "tdx" and doc.collateral == collateral
    # Quote, chain and collateral verify; only report_data gives away that this sample
    # quote was not made for this node's keys.
    issued = 1750328163 + 3600  # one hour after the collateral's tcbInfo issue date
    quote = base64.b64decode(doc.evidence)
    mr_td = quote[48 + 136 : 48 + 184]
    policy = AttestationPolicy(
        allowed_measurements=frozenset({mr_td}),
        now=issued,
        accepted_tcb_statuses=frozenset({"UpToDate"}),
    )
    with pytest.raises(AttestationError, match="tdx: report_data does not match"):
        verify_attestation(doc, policy, expected_nonce=nonce)


def test_the_provider_recorded_for_the_keystore_is_named_only_for_its_key(tmp_path):
    """`imago provider register` notes the Provider beside the node keystore; `node serve`
    names it, but not after the keystore was replaced by another key."""
    keys = load_or_create_keys(tmp_path / "node_keys.json")
    assert recorded_provider(tmp_path) is None
    record_provider(tmp_path, "0:" + "ab" * 32, keys.ed25519_public, "0:" + "cd" * 32)
    assert recorded_provider(tmp_path) == "0:" + "ab" * 32
    assert node_public_key(tmp_path / "node_keys.json") == keys.ed25519_public
    (tmp_path / "node_keys.json").unlink()
    load_or_create_keys(tmp_path / "node_keys.json")  # a new key
    assert recorded_provider(tmp_path) is None
