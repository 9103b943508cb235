"""``fl.secure: ckks``: a round summed under CKKS in ``shoal fl simulate``, with dropouts, a corrupt
upload, and the configurations it refuses."""

import json
import logging
import sys

import pytest
import torch

pytest.importorskip("tenseal", reason="fl.secure=ckks needs TenSEAL: pip install -e '.[he]'")

from shoal.config import ConfigError  # noqa: E402
from shoal.fl.config import load_fl_config  # noqa: E402
from shoal.fl.secure import ckks  # noqa: E402
from shoal.fl.secure.ckks_round import Ckks, CkksOptions  # noqa: E402
from shoal.fl.simulate import simulate  # noqa: E402
from tests.test_fl_local_dp import SMALL  # noqa: E402  digits, an MLP, 10 clients, 5 a round, 6 rounds

NUMEL = 3000
CLIENTS = 5


@pytest.fixture(scope="module")
def mechanism():
    return Ckks(CkksOptions())


def _round(mechanism, drop_at=None, weights=None):
    weights = torch.zeros(NUMEL) if weights is None else weights
    setup = mechanism.setup(1, list(range(CLIENTS)), torch.zeros(NUMEL))
    gen = torch.Generator().manual_seed(0)
    updates = {u: torch.randn(NUMEL, generator=gen) * 0.05 for u in range(CLIENTS)}
    return setup, updates, mechanism.local_round(setup, updates, weights, drop_at=drop_at or {})


def _within_rounding(setup, total, updates, clients):
    """Each client's stochastic rounding moves a coordinate by under one step."""
    plain = sum(updates[u] for u in clients)
    return float((total - plain).abs().max()) <= len(clients) * setup.params.step


def test_the_decrypted_sum_is_the_plain_sum_within_rounding_and_the_server_holds_only_the_public_key(
        mechanism, monkeypatch):
    secret, public = mechanism.contexts(mechanism.setup(1, list(range(CLIENTS)), torch.zeros(NUMEL)).params)
    contexts_added_with = []
    add = ckks.add
    monkeypatch.setattr(ckks, "add", lambda context, *a: contexts_added_with.append(context) or add(context, *a))
    setup, updates, (agg, why, traffic) = _round(mechanism)
    assert why is None and agg.clients == list(range(CLIENTS)) and agg.forged == []
    assert _within_rounding(setup, agg.total, updates, agg.clients)
    assert contexts_added_with == [public] and public != secret
    assert mechanism.contexts(setup.params) == (secret, public)  # one key for every round
    # Up: each client's ciphertext (one chunk: 2,048 slots of 2 values) and, from client 0, the
    # float32 sum it decrypted; down: the encrypted sum, to client 0 alone.
    low, high = setup.params.ciphertext_bytes
    assert all(low <= traffic.uplink[u] <= high for u in range(1, CLIENTS))
    assert low <= traffic.uplink[0] - NUMEL * 4 <= high and traffic.overhead_bytes == NUMEL * 4
    assert list(traffic.downlink) == [0] and low <= traffic.downlink[0] <= high


def test_with_public_key_encryption_the_clients_encrypt_with_the_public_context_and_the_sum_is_as_exact(
        monkeypatch):
    mechanism = Ckks(CkksOptions(public_key_encryption=True))
    contexts_encrypted_with = []
    encrypt = ckks.encrypt
    monkeypatch.setattr(ckks, "encrypt", lambda context, *a, **kw: contexts_encrypted_with.append(context)
                        or encrypt(context, *a, **kw))
    setup, updates, (agg, why, _) = _round(mechanism)
    assert why is None and setup.params.public_key_encryption
    assert _within_rounding(setup, agg.total, updates, agg.clients)
    assert contexts_encrypted_with == [mechanism.contexts(setup.params)[1]] * CLIENTS


@pytest.mark.parametrize("stage", ["keys", "shares", "masked"])
def test_a_client_dropped_before_its_upload_sends_nothing_and_is_not_in_the_sum(mechanism, stage):
    setup, updates, (agg, why, traffic) = _round(mechanism, drop_at={0: stage, 3: stage})
    assert why is None and agg.clients == [1, 2, 4]
    assert _within_rounding(setup, agg.total, updates, agg.clients)
    assert not _within_rounding(setup, agg.total, updates, range(CLIENTS))
    assert set(traffic.uplink) == {1, 2, 4} and list(traffic.downlink) == [1]  # the lowest still there decrypts


def test_a_client_dropped_after_its_upload_is_in_the_sum_but_another_decrypts(mechanism):
    setup, updates, (agg, why, traffic) = _round(mechanism, drop_at={0: "unmask", 1: "unmask"})
    assert why is None and agg.clients == list(range(CLIENTS))
    assert _within_rounding(setup, agg.total, updates, agg.clients)
    assert list(traffic.downlink) == [2]


def test_too_few_uploads_or_no_one_left_to_decrypt_abort_the_round_saying_why(mechanism):
    _, _, (agg, why, _) = _round(mechanism, drop_at={u: "masked" for u in (0, 1, 2)})
    assert agg is None and "only 2 of 5 clients' uploads are in the sum; the round needs 3" in why
    _, _, (agg, why, _) = _round(mechanism, drop_at={u: "unmask" for u in range(CLIENTS)})
    assert agg is None and "none of the 5 clients in the sum returned it decrypted" in why
    _, _, (agg, why, traffic) = _round(mechanism, weights=torch.ones(NUMEL))  # another model than the setup's
    assert agg is None and "only 0 of 5" in why and traffic.uplink == {}


def _truncated(upload):
    return {"ct": upload["ct"][:-1], "ct_sizes": upload["ct_sizes"]}


def _garbled_header(upload):
    ct = upload["ct"].clone()
    ct[:16] = 0  # SEAL's magic and version: its loader refuses it, ckks.check cannot see it
    return {"ct": ct, "ct_sizes": upload["ct_sizes"]}


@pytest.mark.parametrize("corrupt, reason", [(_truncated, "ct_sizes add up to"),
                                             (_garbled_header, "not a ciphertext for this context")])
def test_a_corrupt_upload_is_rejected_and_logged_and_the_round_goes_on_without_it(mechanism, monkeypatch, caplog,
                                                                                   corrupt, reason):
    encrypt, calls = ckks.encrypt, []

    def client_2_corrupts(*args, **kw):
        calls.append(None)
        upload = encrypt(*args, **kw)
        return corrupt(upload) if len(calls) == 3 else upload  # clients encrypt in order 0, 1, 2, ...

    monkeypatch.setattr(ckks, "encrypt", client_2_corrupts)
    with caplog.at_level(logging.WARNING, logger="shoal.fl"):
        setup, updates, (agg, why, traffic) = _round(mechanism)
    assert why is None and agg.clients == [0, 1, 3, 4]
    assert _within_rounding(setup, agg.total, updates, agg.clients)
    assert "client 2's upload rejected: " in caplog.text and reason in caplog.text
    assert 2 in traffic.uplink  # it was sent, and counted, before the server refused it


def test_a_simulation_with_ckks_trains_as_plain_fedavg_does(tmp_path):
    plain = simulate(load_fl_config(SMALL, out=str(tmp_path / "plain")), progress=False)
    secure = simulate(load_fl_config(SMALL, ["fl.secure=ckks"], out=str(tmp_path / "secure")), progress=False)
    assert secure["secure"] == "ckks" and secure["secure_aborted_rounds"] == 0
    assert abs(secure["final_accuracy"] - plain["final_accuracy"]) <= 0.02
    rounds = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 6 and all(r["secure_clients"] == 5 and r["aggregated"] for r in rounds)
    # Beyond the ciphertexts, one client's float32 sum: the bytes of one plain update.
    fp32_update = plain["uplink_bytes"] // (6 * 5)
    assert all(r["secure_overhead_bytes"] == fp32_update for r in rounds)


def test_ckks_with_fl_privacy_or_without_tenseal_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="distributed DP noise is built for secagg; fl.secure=ckks cannot"):
        load_fl_config(SMALL, ["fl.secure=ckks", "fl.privacy.noise_multiplier=1.0", "fl.privacy.where=client"])
    load_fl_config(SMALL, ["fl.secure=ckks"])
    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(ConfigError, match=r"ckks needs TenSEAL, which is not installed: pip install -e '\.\[he\]'"):
        load_fl_config(SMALL, ["fl.secure=ckks"])

