"""fl/secure/ckks.py: clients' updates packed, encrypted with CKKS, summed by a server that cannot read them."""

import dataclasses
import math
import sys

import pytest
import torch

ts = pytest.importorskip("tenseal", reason="homomorphic aggregation needs TenSEAL: pip install -e '.[he]'")

from shoal.fl.secure import ckks  # noqa: E402

CLIENTS = 100
NUMEL = 3_000


def _updates(clients, numel, *, seed=0, large=False):
    gen = torch.Generator().manual_seed(seed)
    updates = [torch.randn(numel, generator=gen) * 0.01 for _ in range(clients)]
    for u in updates if large else []:
        u[:8] += 0.3  # a few coordinates every client moves a lot, as a bias might
    return updates


def _seeds(clients):
    return [torch.Generator().manual_seed(1000 + i) for i in range(clients)]


def _rel_error(total, updates):
    plain = torch.stack(updates).double().sum(0)
    return float((total.double() - plain).norm() / plain.norm())


def _wire(blobs):
    return ckks._to_wire(blobs)


@pytest.fixture(scope="module")
def params():
    return ckks.CkksParams.for_addition(CLIENTS, clip_range=0.06)


@pytest.fixture(scope="module")
def keys(params):
    return ckks.keygen(params)


@pytest.fixture(scope="module")
def hundred(params, keys):
    """100 clients' updates, their uploads and the server's encrypted sum at the default parameters."""
    secret, public = keys
    updates = _updates(CLIENTS, NUMEL)
    uploads = [ckks.encrypt(secret, params, u, generator=g) for u, g in zip(updates, _seeds(CLIENTS))]
    return updates, uploads, ckks.add(public, params, uploads)


def test_default_parameters_pack_two_14_bit_values_a_slot_under_one_57_bit_prime(params):
    assert (params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.scale_bits) == (4096, (57, 52), 15)
    assert (params.values_per_slot, params.field_bits, params.packed_bits) == (2, 21, 42)
    assert params.error_bound(CLIENTS) < 0.5


def test_the_decoded_sum_is_exactly_the_sum_of_the_clients_levels(params, keys, hundred):
    secret, _ = keys
    updates, _, summed = hundred
    levels = sum(ckks.quantize(params, u, generator=g) for u, g in zip(updates, _seeds(CLIENTS)))

    slots = ckks._decrypt_slots(secret, params, summed, NUMEL)
    total = ckks.decrypt(secret, params, summed, NUMEL, CLIENTS)

    error = (slots - ckks._pack(params, levels).reshape(-1)).abs().max().item()
    assert error < params.error_bound(CLIENTS) < 0.5  # CKKS noise and float64 rounding together
    assert torch.equal(total, (levels.double() * params.step).float())


def test_a_100_client_sum_at_the_defaults_errs_only_by_14_bit_rounding(params, keys, hundred):
    secret, _ = keys
    updates, _, summed = hundred
    total = ckks.decrypt(secret, params, summed, NUMEL, CLIENTS)
    plain_norm = torch.stack(updates).double().sum(0).norm().item()
    # Stochastic rounding has variance at most step**2 / 4 a coordinate and client.
    bound = params.step / 2 * math.sqrt(CLIENTS * NUMEL) / plain_norm
    assert 1e-4 < _rel_error(total, updates) < bound < 5e-4


@pytest.mark.parametrize("large, clip", [(False, 0.06), (True, 0.35)])
def test_a_100_client_sum_at_16_bits_is_within_1e_4_of_the_plain_sum(large, clip):
    params = ckks.CkksParams.for_addition(CLIENTS, value_bits=16, clip_range=clip)
    secret, public = ckks.keygen(params)
    updates = _updates(CLIENTS, 4_096, seed=1, large=large)

    summed = ckks.add(public, params, [ckks.encrypt(secret, params, u, generator=g)
                                       for u, g in zip(updates, _seeds(CLIENTS))])

    assert _rel_error(ckks.decrypt(secret, params, summed, 4_096, CLIENTS), updates) < 1e-4


def test_stochastic_rounding_is_unbiased_and_clips(params):
    fractions = torch.tensor([0.1, 0.3, 0.5, 0.9])
    update = ((3 + fractions) * params.step).float().repeat(20_000)
    levels = ckks.quantize(params, update, generator=torch.Generator().manual_seed(0)).view(-1, 4).double()
    exact = update[:4].double() / params.step
    stderr = (fractions * (1 - fractions) / 20_000).sqrt()
    assert ((levels.mean(0) - exact).abs() < 4 * stderr).all()  # nearest rounding would be off by 0.1..0.5
    assert set(levels.unique().tolist()) == {3.0, 4.0}
    clipped = ckks.quantize(params, torch.tensor([5.0, -5.0]), generator=torch.Generator().manual_seed(0))
    assert clipped.tolist() == [params.levels, -params.levels]


def test_the_same_generator_gives_the_same_rounding(params):
    update = torch.randn(1000) * 0.01
    a = ckks.quantize(params, update, generator=torch.Generator().manual_seed(7))
    b = ckks.quantize(params, update, generator=torch.Generator().manual_seed(7))
    c = ckks.quantize(params, update)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_185k_parameter_update_takes_at_most_16_bytes_a_parameter_and_a_quarter_of_tenseals_default(params, keys):
    update = torch.randn(185_000) * 0.01
    packed = ckks.encrypt(keys[0], params, update)
    default = ckks._tenseal_default(params)[0](update)

    per_param = ckks.wire_bytes(packed) / 185_000
    assert per_param <= 16
    assert ckks.wire_bytes(default) / 185_000 > 4 * per_param
    assert packed["ct_sizes"].numel() == params.chunks(185_000) == 46


def test_the_server_adds_with_the_public_context_but_only_the_secret_one_decrypts(params, keys, hundred):
    secret, public = keys
    updates, uploads, summed = hundred
    server = ts.context_from(public)
    chunk = ckks._tenseal_proto(params, ckks._split(params, summed, "")[0])

    assert not server.is_private() and ts.context_from(secret).is_private()
    with pytest.raises(ValueError, match="secret_key"):  # TenSEAL's own refusal
        ts.ckks_vector_from(server, chunk).decrypt()
    with pytest.raises(ValueError, match="secret context"):
        ckks.decrypt(public, params, summed, NUMEL, CLIENTS)
    with pytest.raises(ValueError, match="secret context"):  # symmetric: the server cannot encrypt either
        ckks.encrypt(public, params, updates[0])
    assert len(ts.ckks_vector_from(ts.context_from(secret), chunk).decrypt()) == params.slots


def test_with_public_key_encryption_the_public_context_encrypts_and_sums_stay_exact():
    params = ckks.CkksParams.for_addition(3, clip_range=0.06, public_key_encryption=True)
    secret, public = ckks.keygen(params)
    updates = _updates(3, 5_000)

    summed = ckks.add(public, params, [ckks.encrypt(public, params, u, generator=g)
                                       for u, g in zip(updates, _seeds(3))])

    levels = sum(ckks.quantize(params, u, generator=g) for u, g in zip(updates, _seeds(3)))
    assert torch.equal(ckks.decrypt(secret, params, summed, 5_000, 3), (levels.double() * params.step).float())
    with pytest.raises(ValueError, match="secret context"):
        ckks.decrypt(public, params, summed, 5_000, 3)


@pytest.mark.parametrize("sizes", [(60, 49), (31, 31, 47), (40, 14), (57, 52)])
def test_the_primes_the_bound_uses_are_the_ones_seal_picks(sizes):
    n = 2048 if sizes == (40, 14) else 4096
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=list(sizes))
    assert ckks._context_primes(ctx) == (n, *ckks._seal_primes(n, sizes))


def test_malformed_uploads_are_refused_before_tenseal_sees_them(params, hundred):
    _, uploads, _ = hundred
    good = uploads[0]
    low, high = params.ciphertext_bytes
    cases = {
        "an encrypted update is": {"ct": good["ct"]},
        "ct must be a 1-D torch.uint8": {"ct": good["ct"].to(torch.int16), "ct_sizes": good["ct_sizes"]},
        "ct_sizes must be a 1-D torch.int64": {"ct": good["ct"], "ct_sizes": good["ct_sizes"].view(1, -1)},
        "1 chunks, but the update.s values take 2": good,
        "add up to": {"ct": good["ct"][:-1], "ct_sizes": good["ct_sizes"]},
        f"takes {low}..{high}": {"ct": torch.zeros(high + 1, dtype=torch.uint8),
                                 "ct_sizes": torch.tensor([high + 1])},
        "is 10 bytes": {"ct": torch.zeros(10, dtype=torch.uint8), "ct_sizes": torch.tensor([10])},
    }
    for reason, tensors in cases.items():
        with pytest.raises(ValueError, match=reason):
            ckks.check(params, tensors, 5_000 if reason.startswith("1 chunks") else NUMEL)
    ckks.check(params, good, NUMEL)


def test_bad_ciphertexts_are_refused_with_a_reason(params, keys, hundred):
    secret, public = keys
    _, uploads, _ = hundred
    blob = ckks._split(params, uploads[0], "")[0]
    other = ckks.CkksParams.for_addition(CLIENTS, value_bits=12, clip_range=0.06)  # primes (53, 56)
    rescaled = ts.context_from(secret)
    rescaled.global_scale = 2.0**16
    cases = {
        "truncated": blob[:-100],
        "garbage": bytes(range(256)) * (len(blob) // 256),
        "another context": ckks._split(other, ckks.encrypt(ckks.keygen(other)[0], other, torch.zeros(10)), "")[0],
        "another scale": ckks._seal_bytes(ts.ckks_vector(rescaled, [0.0] * params.slots).serialize()),
    }
    for case, bad in cases.items():
        with pytest.raises(ValueError, match="upload 1, chunk 0: "):
            ckks.add(public, params, [uploads[0], _wire([bad])])
    with pytest.raises(ValueError, match="upload 1 has 2 chunks, upload 0 has 1"):
        ckks.add(public, params, [uploads[0], _wire([blob, blob])])
    with pytest.raises(ValueError, match="clients must be 1..100"):
        ckks.decrypt(secret, params, uploads[0], NUMEL, CLIENTS + 1)


def test_a_flipped_byte_in_a_ciphertext_is_refused_at_loading_or_at_decryption(params, keys, hundred):
    secret, public = keys
    _, uploads, _ = hundred
    blob = ckks._split(params, uploads[0], "")[0]
    gen = torch.Generator().manual_seed(0)
    for i in torch.randint(100, len(blob), (10,), generator=gen).tolist():
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(ValueError, match="not a ciphertext|out of range"):
            summed = ckks.add(public, params, [uploads[1], _wire([bytes(bad)])])
            ckks.decrypt(secret, params, summed, NUMEL, 2)


def test_a_sum_under_another_key_of_the_same_parameters_is_refused_at_decryption(params, keys, hundred):
    secret, _ = keys
    stranger_secret, stranger_public = ckks.keygen(params)
    upload = ckks.encrypt(stranger_secret, params, torch.randn(NUMEL) * 0.01)
    summed = ckks.add(stranger_public, params, [upload, upload])
    with pytest.raises(ValueError, match="decrypted sum is out of range for 2 clients"):
        ckks.decrypt(secret, params, summed, NUMEL, 2)
    assert ckks.decrypt(stranger_secret, params, summed, NUMEL, 2).shape == (NUMEL,)


def test_parameters_that_would_overflow_are_refused_naming_the_parameter(params):
    replace = lambda **kw: dataclasses.replace(params, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="values_per_slot=3 .* pack 63 bits"):
        replace(values_per_slot=3)
    with pytest.raises(ValueError, match="values_per_slot=2 .* pack 48 bits"):
        replace(max_clients=1000)
    with pytest.raises(ValueError, match="scale_bits=14 is too small for 100 clients"):
        replace(scale_bits=14)
    with pytest.raises(ValueError, match=r"coeff_mod_bit_sizes \(56, 52\): data primes of 56 bits"):
        replace(coeff_mod_bit_sizes=(56, 52))
    with pytest.raises(ValueError, match="over the 109 that poly_modulus_degree=4096 allows"):
        replace(coeff_mod_bit_sizes=(57, 53))
    with pytest.raises(ValueError, match="clip_range must be a positive finite number"):
        replace(clip_range=float("inf"))
    with pytest.raises(ValueError, match="no sound CKKS parameters for value_bits=40"):
        ckks.CkksParams.for_addition(CLIENTS, value_bits=40, clip_range=0.06)
    with pytest.raises(ValueError, match="cannot hold scale_bits=16"):
        replace(scale_bits=16)
    assert replace(scale_bits=16, coeff_mod_bit_sizes=(58, 51)).scale_bits == 16  # a bit more scale, a bit more prime


def test_a_missing_tenseal_names_the_extra_to_install(params, keys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[he\]'"):
        ckks.encrypt(keys[0], params, torch.zeros(10))
