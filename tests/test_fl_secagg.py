"""SecAgg+ (``fl.secure: secagg``): the server gets the sum and only the sum, despite dropouts at
every stage, hostile messages and a model sent to one client alone; in simulation and over gRPC."""

import json
import subprocess

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from shoal.comm.bitpack import unpack_wide
from shoal.config import ConfigError
from shoal.fl import wire
from shoal.fl.certs import TlsFiles
from shoal.fl.config import load_fl_config
from shoal.fl.secure import fixed_point, neighbours, shamir
from shoal.fl.secure import secagg as sa
from shoal.fl.simulate import simulate
from shoal.fl.transport import Connection, RpcFailed
from shoal.privacy.accountant import epsilon
from tests.fl_federation import federation
from tests.test_fl_local_dp import SMALL  # digits, an MLP, 10 clients, 5 a round, 6 rounds

D = 3000


def _setup(n=10, numel=D, weights=None, **kw):
    weights = torch.zeros(numel) if weights is None else weights
    options = {"value_bits": 16, "clip_range": 0.5, "neighbours_k": None, "threshold": 0.5, "min_fraction": 0.5}
    return sa.plan(1, list(range(n)), numel, sa.model_hash(weights), **{**options, **kw})


def _updates(n, numel=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {u: torch.randn(numel, generator=g) * 0.05 for u in range(n)}


def _step(setup):
    return setup.clip_range / fixed_point.levels(setup.value_bits)


def test_shamir_any_t_shares_recover_the_secret_and_a_forged_one_is_found():
    secret = int.from_bytes(bytes(range(32)), "little")
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir.combine({x: shares[x] for x in (1, 3, 5)}) == secret
    assert shamir.combine({x: shares[x] for x in (1, 3)}) != secret  # two of a degree-2 polynomial: no
    shares[2] = (shares[2] + 1) % shamir.P
    found = shamir.combine_checked(shares, 3, lambda s: s == secret)
    assert found == (secret, [2])


def test_fixed_point_codes_are_unbiased_and_clipped():
    value = torch.full((200_000,), 0.1234)
    codes = fixed_point.encode(value, 0.5, 8, np.random.default_rng(1))  # 127 levels: step 0.5 / 127
    assert set(np.unique(codes)) == {31, 32}  # 0.1234 * 254 = 31.34: the two neighbours only
    assert codes.mean() * 0.5 / 127 == pytest.approx(0.1234, rel=1e-3)
    assert fixed_point.encode(torch.tensor([9.0, -9.0]), 0.5, 8, np.random.default_rng(1)).tolist() == [127, -127]


def test_the_neighbour_graph_is_k_regular_symmetric_and_the_same_from_the_seed():
    parts = list(range(0, 200, 2))
    k = neighbours.degree(len(parts))
    g = neighbours.graph(parts, k, seed=5)
    assert k == 22 and all(len(v) == k for v in g.values())
    assert all(u in g[v] for u in g for v in g[u]) and g == neighbours.graph(parts, k, seed=5)
    assert neighbours.graph(parts, k, seed=6) != g
    assert neighbours.graph(list(range(8)), neighbours.degree(8), 0)[3] == [0, 1, 2, 4, 5, 6, 7]


@pytest.mark.parametrize("stage", ["unmask", "masked", "shares", "keys"])
def test_the_sum_is_the_survivors_plain_sum_with_30_percent_dropped_at_any_stage(stage):
    setup, updates = _setup(), _updates(10)
    dropped = {0, 4, 7}
    agg, why, traffic = sa.run_round(setup, updates, torch.zeros(D), drop_at={u: stage for u in dropped})
    assert why is None
    # Dropped after sending its masked input: still in the sum (unmasked from the survivors' shares).
    expected = set(range(10)) if stage == "unmask" else set(range(10)) - dropped
    assert set(agg.clients) == expected and agg.forged == []
    plain = sum(updates[u] for u in agg.clients)
    assert (agg.total - plain).abs().max() <= len(agg.clients) * _step(setup)  # one step a client at most
    assert (agg.total - plain).abs().max() > 0  # and quantised: not the plain sum smuggled through


def test_too_few_survivors_abort_the_round_saying_why():
    agg, why, _ = sa.run_round(_setup(), _updates(10), torch.zeros(D), drop_at={u: "masked" for u in range(6)})
    assert agg is None and "only 4 of 10 clients sent a masked input" in why and "needs 5" in why


def test_a_masked_input_is_uniform_and_the_unmasked_codes_are_not():
    setup = _setup(numel=50_000)
    update = torch.randn(50_000) * 0.05
    clients, _, replies, _ = _run_to("masked", setup)
    y = clients[3].masked_input(replies[3], update)["y"].numpy()
    masked = unpack_wide(y, setup.bits, 50_000)
    plain = fixed_point.to_residues(fixed_point.encode(update, 0.5, 16, np.random.default_rng(0)))
    plain &= np.uint32((1 << setup.bits) - 1)

    def p_value(values):
        counts = np.bincount(values >> np.uint32(setup.bits - 6), minlength=64)  # the top 6 bits
        return chisquare(counts).pvalue

    assert p_value(masked) > 1e-4
    assert p_value(plain) < 1e-30


def _run_to(stage, setup=None, weights=None):
    """Clients and a server with every stage before ``stage`` done; returns them and the replies."""
    setup = setup or _setup()
    weights = torch.zeros(setup.numel) if weights is None else weights
    clients = {u: sa.SecAggClient(setup, u, weights) for u in setup.participants}
    server = sa.SecAggServer(setup)
    replies = {}
    updates = _updates(len(clients), setup.numel)
    for s in sa.STAGES[:sa.STAGES.index(stage)]:
        for u, c in clients.items():
            message = {"keys": lambda: c.advertise(), "shares": lambda: c.share(replies[u]),
                       "masked": lambda: c.masked_input(replies[u], updates[u]),
                       "unmask": lambda: c.unmask(replies[u])}[s]()
            server.receive(s, u, message)
        server.close()
        replies = {u: server.reply(s, u)[1] for u in clients}
    return clients, server, replies, updates


def test_wrong_lengths_wrong_stages_and_replays_are_refused():
    clients, server, replies, updates = _run_to("masked")
    message = clients[1].masked_input(replies[1], updates[1])
    with pytest.raises(sa.ProtocolError, match="masked input of 9 bytes"):
        server.receive("masked", 1, {"y": message["y"][:9]})
    with pytest.raises(sa.ProtocolError, match="expected the tensors"):
        server.receive("masked", 1, {"y": message["y"], "extra": torch.zeros(1)})
    with pytest.raises(sa.ProtocolError, match="is torch.int32"):
        server.receive("masked", 1, {"y": message["y"].to(torch.int32)})
    server.receive("masked", 1, message)
    with pytest.raises(sa.ProtocolError, match="already sent its 'masked' message"):
        server.receive("masked", 1, message)
    with pytest.raises(sa.ProtocolError, match="stage 'keys' is not open"):
        server.receive("keys", 2, {"c_pk": torch.zeros(32, dtype=torch.uint8), "s_pk": torch.zeros(32, dtype=torch.uint8)})
    with pytest.raises(sa.ProtocolError, match="out of turn"):
        clients[1].masked_input(replies[1], updates[1])  # a client masks once
    with pytest.raises(sa.ProtocolError, match="no part in stage"):
        server.receive("masked", 99, message)


def test_shares_addressed_to_others_or_forged_are_refused_or_found():
    clients, server, replies, _ = _run_to("shares")
    message = clients[0].share(replies[0])
    with pytest.raises(sa.ProtocolError, match="shares addressed to"):
        server.receive("shares", 0, {**message, "to": message["to"].flip(0)})
    with pytest.raises(sa.ProtocolError, match="rows of 156 bytes"):
        server.receive("shares", 0, {**message, "ct": message["ct"][:, :100]})
    # A share tampered with on the way does not decrypt: its receiver refuses the round.
    clients, server, replies, updates = _run_to("masked")
    replies[5]["ct"][0, 20] ^= 1
    with pytest.raises(sa.ProtocolError, match="does not decrypt"):
        clients[5].masked_input(replies[5], updates[5])


def test_a_forged_share_at_unmasking_is_found_and_the_sum_still_right():
    clients, server, replies, updates = _run_to("unmask")
    for u, c in clients.items():
        answer = c.unmask(replies[u])
        if u == 2:  # client 2 lies about its share of its first survivor's self mask
            answer["b"][0, 0] ^= 0x55
        server.receive("unmask", u, answer)
    server.close()
    agg = server.result()
    lied_about = replies[2]["survivors"][0].item()
    assert (2, lied_about, "b") in agg.forged
    plain = sum(updates.values())
    assert (agg.total - plain).abs().max() <= 10 * _step(server.setup)
    share_over_p = {"b_from": replies[3]["survivors"], "sk_from": replies[3]["dropped"],
                    "b": torch.full((len(replies[3]["survivors"]), 66), 255, dtype=torch.uint8),
                    "sk": torch.zeros((0, 66), dtype=torch.uint8)}
    fresh_clients, fresh, fresh_replies, _ = _run_to("unmask")
    with pytest.raises(sa.ProtocolError, match="below the field's prime"):
        fresh.receive("unmask", 3, {**share_over_p, "b_from": fresh_replies[3]["survivors"]})


def test_a_client_never_reveals_both_shares_of_one_client_nor_answers_twice():
    clients, server, replies, _ = _run_to("unmask")
    request = replies[4]
    both = {"survivors": request["survivors"], "dropped": request["survivors"][:1].clone()}
    with pytest.raises(sa.ProtocolError, match="named both as survivors and as dropped"):
        clients[4].unmask(both)
    clients[6].unmask(replies[6])
    with pytest.raises(sa.ProtocolError, match="out of turn"):
        clients[6].unmask({"survivors": torch.zeros(0, dtype=torch.int64),
                           "dropped": replies[6]["survivors"]})  # asked again, now for the other share


def test_a_client_sent_another_model_refuses_it_and_one_isolated_by_the_server_is_refused_by_its_neighbours():
    weights = torch.randn(D)
    setup = _setup(weights=weights)
    with pytest.raises(sa.ProtocolError, match="do not match the model hash"):
        sa.SecAggClient(setup, 0, weights + 1e-3)
    # The server gives client 0 another model and a setup with that model's hash: its derived keys
    # differ from everyone else's, so its neighbours cannot open its shares and refuse the round.
    other = weights.clone()
    other[0] += 1
    isolated = sa.Setup.from_meta({**setup.to_meta(), "model_hash": sa.model_hash(other)}, numel=D)
    clients = {u: sa.SecAggClient(setup, u, weights) for u in setup.participants if u}
    clients[0] = sa.SecAggClient(isolated, 0, other)
    server = sa.SecAggServer(setup)
    for u, c in clients.items():
        server.receive("keys", u, c.advertise())
    server.close()
    for u, c in clients.items():
        server.receive("shares", u, c.share(server.reply("keys", u)[1]))
    server.close()
    refused = 0
    for u in setup.graph[0]:
        with pytest.raises(sa.ProtocolError, match="from client 0 does not decrypt"):
            clients[u].masked_input(server.reply("shares", u)[1], torch.zeros(D))
        refused += 1
    assert refused == setup.k


def test_a_setup_that_would_let_the_sum_wrap_is_refused():
    meta = _setup().to_meta()
    with pytest.raises(sa.ProtocolError, match="would let the sum of 10 inputs wrap"):
        sa.Setup.from_meta({**meta, "bits": 18})
    with pytest.raises(sa.ProtocolError, match="exactly the keys"):
        sa.Setup.from_meta({**meta, "extra": 1})
    with pytest.raises(sa.ProtocolError, match="model has 5 values"):
        sa.Setup.from_meta(meta, numel=5)
    assert sa.Setup.from_meta(meta, numel=D) == _setup().__class__(**{**meta, "participants": tuple(range(10))})


def test_distributed_noise_has_the_planned_variance_and_the_sum_fits_its_bits():
    setup = _setup(noise_std=2.0)
    step = _step(setup)
    # Each of the 5 shares it needs carries a fifth of the variance of N(0, 2^2) (in levels).
    assert setup.noise_variance == pytest.approx((2.0 / step) ** 2 / 5)
    agg, why, _ = sa.run_round(setup, {u: torch.zeros(D) for u in range(10)}, torch.zeros(D))
    assert why is None
    # Ten shares: twice the planned noise, std 2 * sqrt(2); none of it wrapped.
    assert agg.total.std().item() == pytest.approx(2.0 * np.sqrt(2), rel=0.08)




@pytest.mark.parametrize("setting, message", [
    (["fl.codec=int8"], "fl.codec must be none"),
    (["fl.strategy=fedmedian"], "cannot use"),
    (["fl.clients_per_round=2", "fl.min_clients=1"], "clients_per_round >= 3"),
    (["fl.privacy.noise_multiplier=1.0"], "set fl.privacy.where=client"),
    (["fl.privacy.noise_multiplier=1.0", "fl.privacy.where=client", "fl.privacy.adaptive=true"],
     "adaptive clipping needs"),
    (["server.max_update_norm=5"], "sees no single update"),
    (["fl.secure=secagg:value_bits=40"], "value_bits"),
])
def test_what_secure_aggregation_cannot_honour_is_a_config_error(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_fl_config(SMALL, ["fl.secure=secagg", *setting])
    with pytest.raises(ConfigError, match="is a stage of secure aggregation"):
        load_fl_config(SMALL, ["fl.fleet.drop_stage=masked"])


def test_a_simulation_with_secagg_trains_as_plain_fedavg_does_on_less_uplink(tmp_path):
    plain = simulate(load_fl_config(SMALL, out=str(tmp_path / "plain")), progress=False)
    secure = simulate(load_fl_config(SMALL, ["fl.secure=secagg"], out=str(tmp_path / "secure")), progress=False)
    assert secure["secure"] == "secagg" and secure["secure_aborted_rounds"] == 0
    assert abs(secure["final_accuracy"] - plain["final_accuracy"]) <= 0.02
    assert secure["uplink_bytes"] < 0.8 * plain["uplink_bytes"]
    rounds = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["secure_clients"] == 5 and r["aggregated"] for r in rounds)
    # Per client: two 32-byte keys, a 32-byte commitment, k ids and 156-byte encrypted share pairs,
    # and at unmasking k ids and 66-byte shares; k = 4 of 5. Independent of the model's size.
    assert all(r["secure_overhead_bytes"] == 5 * (96 + (8 + 156 + 8 + 66) * 4) for r in rounds)


def test_a_simulation_recovers_clients_that_drop_after_masking(tmp_path):
    cfg = load_fl_config(SMALL, ["fl.secure=secagg", "fl.clients_per_round=10", "fl.fleet.dropout=0.3",
                                 "fl.fleet.drop_stage=unmask"], out=str(tmp_path))
    simulate(cfg, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["dropped"] for r in rounds) > 0
    # Gone after their masked input: still counted, unmasked from their neighbours' shares
    # (each has 9, 5 of whose shares recover it; a round with over 4 dropped would abort).
    assert all(r["secure_clients"] == 10 and r["aggregated"] for r in rounds if r["dropped"] <= 4)


@pytest.mark.processes
def test_dp_fedavg_through_secagg_over_grpc_spends_what_the_accountant_says(tmp_path):
    body = """
data: {dataset: digits, batch_size: 16}
model: mlp:hidden=[32]
optimizer: {name: sgd, lr: 0.2, momentum: 0.0}
fl: {clients: 3, clients_per_round: 3, min_clients: 3, rounds: 3, eval_every: 1, deadline_s: 60,
     secure: "secagg:stage_timeout_s=20",
     privacy: {noise_multiplier: 1.0, clip: 1.0, where: client}}
"""
    with federation(tmp_path, body, clients=3) as fed:
        # A message for a round that is not open, and one that is no message at all: refused, logged.
        with Connection(fed.address, TlsFiles.client(tmp_path / "certs", "client0"), retry_for_s=30) as conn:
            stale = {"token": fed.tokens[0], "partition": 0, "round": 99, "stage": "keys"}
            meta, _ = wire.unpack(conn.call("Secure", wire.pack(stale, {"c_pk": torch.zeros(32, dtype=torch.uint8),
                                                                        "s_pk": torch.zeros(32, dtype=torch.uint8)})))
            assert "round 99 is not a secure round open for partition 0" in meta["excluded"]
            with pytest.raises(RpcFailed, match="INVALID_ARGUMENT"):
                conn.call("Secure", b"SHFL\x01garbage")
        for p in fed.procs:
            assert p.wait(timeout=240) == 0, fed.logs()
    summary = json.loads((fed.out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["secure"] == "secagg:stage_timeout_s=20.0"
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilon(1.0, 1.0, 3, 1e-5), rel=1e-3)
    rounds = [json.loads(line) for line in (fed.out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aggregated"] and r["secure_clients"] == 3 and r["noise_added_by"] == "clients" for r in rounds)
    assert all(r["secure_overhead_bytes"] == 3 * (96 + (8 + 156 + 8 + 66) * 2) for r in rounds)  # k = 2 of 3
    assert "masked input sent (secure aggregation)" in (tmp_path / "client0.log").read_text()
    server_log = (tmp_path / "server.log").read_text()
    assert "stage 'keys') refused: round 99 is not a secure round" in server_log
    assert "rejected a malformed message" in server_log
