"""``shoal bench secure``: what secure aggregation costs against plain aggregation, per client and on the server.

For each number of clients n and share of them dropped, one round of SecAgg+
(:mod:`shoal.fl.secure.secagg`) over updates the size of the demo model
(185,418 values by default) runs through :func:`~shoal.fl.secure.secagg.run_round`'s
messages, each packed and unpacked with :mod:`shoal.fl.wire` as gRPC would carry
it, in this process. The dropped clients leave after sharing their secrets and
before sending a masked input: the costliest case for the server, which must
recover each one's key and remove its masks with every surviving neighbour.

Per row: the uplink bytes of one client (its masked input and everything else:
keys, encrypted shares, commitment, unmasking shares) against plain fp32
(4 bytes a value, what an uncompressed FedAvg client sends), the client's
seconds (the median over clients of its own four stages), the server's
seconds (taking every message, closing the stages, unmasking) with the
unmasking alone beside them, and the plain server's seconds to unpack and
sum the same number of fp32 updates. On a fleet the clients' stages run in
parallel, so a round's added latency is about one client's seconds plus the
server's (``critical_path_s``); here every client runs on this machine, one
after another.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shoal.fl import wire
from shoal.fl.secure import secagg as sa
from shoal.metrics.summary import write_json_atomic

COLUMNS = ["label", "clients", "dropped", "uplink_bytes_per_client", "uplink_vs_fp32", "overhead_fraction",
           "client_s", "server_s", "unmask_s", "plain_server_s", "critical_path_s", "max_abs_error", "note"]


def timed_round(setup: sa.Setup, updates: dict[int, torch.Tensor], weights: torch.Tensor,
                drop: set[int]) -> dict[str, Any]:
    """One round with every party's time kept apart; ``drop`` leave before their masked input."""
    server = sa.SecAggServer(setup)
    clients = {u: sa.SecAggClient(setup, u, weights) for u in updates}
    spent = {u: 0.0 for u in clients}
    up = {u: 0 for u in clients}
    masked = 0
    server_s = 0.0
    replies: dict[int, dict[str, torch.Tensor]] = {}
    for stage in sa.STAGES:
        for u, c in clients.items():
            if (stage != "keys" and u not in replies) or (u in drop and stage in ("masked", "unmask")):
                continue
            t = time.perf_counter()
            message = {"keys": lambda: c.advertise(), "shares": lambda: c.share(replies[u]),
                       "masked": lambda: c.masked_input(replies[u], updates[u]),
                       "unmask": lambda: c.unmask(replies[u])}[stage]()
            packed = wire.pack({"stage": stage}, message)
            spent[u] += time.perf_counter() - t
            up[u] += wire.payload_bytes(message)
            if stage == "masked":
                masked += wire.payload_bytes(message)
            t = time.perf_counter()
            server.receive(stage, u, wire.unpack(packed)[1])
            server_s += time.perf_counter() - t
        t = time.perf_counter()
        server.close()
        out = {"keys": server.u1, "shares": server.u2, "masked": server.u3, "unmask": set()}[stage]
        packed_replies = {u: wire.pack({}, server.reply(stage, u)[1]) for u in out}
        server_s += time.perf_counter() - t
        t = time.perf_counter()
        replies = {u: wire.unpack(m)[1] for u, m in packed_replies.items()}
        if replies:  # unpacking a reply is its client's work
            share = (time.perf_counter() - t) / len(replies)
            for u in replies:
                spent[u] += share
    t = time.perf_counter()
    agg = server.result()
    unmask_s = time.perf_counter() - t
    plain = sum(updates[u] for u in agg.clients)
    survivors = [u for u in clients if u not in drop]
    return {"client_s": statistics.median(spent[u] for u in survivors), "server_s": server_s + unmask_s,
            "unmask_s": unmask_s, "uplink_bytes_per_client": statistics.median(up[u] for u in survivors),
            "overhead_bytes_per_client": statistics.median(up[u] for u in survivors) - masked / len(survivors),
            "max_abs_error": float((agg.total - plain).abs().max()), "survivors": len(agg.clients),
            "bits": setup.bits}


def plain_server_s(updates: dict[int, torch.Tensor], drop: set[int]) -> float:
    """The plain server's work on the same round: unpack each fp32 update that arrived and sum them."""
    packed = [wire.pack({}, {"p0": updates[u]}) for u in updates if u not in drop]
    t = time.perf_counter()
    total = torch.zeros_like(next(iter(updates.values())))
    for m in packed:
        total += wire.unpack(m)[1]["p0"]
    return time.perf_counter() - t


def run_bench(*, clients: list[int], drops: list[float], numel: int, repeat: int, out: Path,
              log: Callable[[str], None] = print, value_bits: int = 16, threshold: float = 0.5,
              neighbours: int | None = None, flower: bool = False) -> list[dict[str, Any]]:
    """Every (n, dropped share) row, medians over ``repeat`` rounds; writes OUT/bench.json.

    ``flower``: after each row, Flower 1.42's SecAgg+ on the same updates, drops, k and t
    (:mod:`shoal.bench.flower_secagg`)."""
    out.mkdir(parents=True, exist_ok=True)
    if flower:
        logging.getLogger("flwr").setLevel(logging.WARNING)  # its per-stage INFO lines
    rows = []
    weights = torch.zeros(numel)
    for n in clients:
        g = torch.Generator().manual_seed(n)
        updates = {u: torch.randn(numel, generator=g) * 0.01 for u in range(n)}
        for fraction in drops:
            drop = set(np.random.default_rng(n).permutation(n)[: round(fraction * n)].tolist())
            label = f"secagg-n{n}-drop{round(fraction * 100)}"
            runs, plains = [], []
            try:
                for _ in range(repeat):
                    setup = sa.plan(1, list(range(n)), numel, sa.model_hash(weights), value_bits=value_bits,
                                    clip_range=0.5, neighbours_k=neighbours, threshold=threshold,
                                    min_fraction=0.5)
                    runs.append(timed_round(setup, updates, weights, drop))
                    plains.append(plain_server_s(updates, drop))
            except sa.RoundAborted as err:  # too many dropped for this n: what the protocol does, reported
                rows.append({"label": label, "clients": n, "dropped": len(drop), "note": f"aborted: {err}",
                             "failed": False})
                log(f"{label}: aborted: {err}")
                if flower:
                    rows.append(flower_row(label, updates, drop, setup, repeat, plain_server_s(updates, drop), log))
                continue
            row: dict[str, Any] = {"label": label, "failed": False, "clients": n, "dropped": len(drop), "numel": numel,
                                   "neighbours": setup.k, "threshold": setup.threshold, "bits": setup.bits}
            for key in runs[0]:
                row[key] = statistics.median(r[key] for r in runs)
            row["plain_server_s"] = statistics.median(plains)
            finish_row(row, numel)
            rows.append(row)
            log(f"{label}: uplink {row['uplink_vs_fp32']:.3f}x fp32 ({row['bits']} bits), keys and shares "
                f"{100 * row['overhead_fraction']:.2f}% of it; client {row['client_s']:.3f} s, server "
                f"{row['server_s']:.3f} s (unmasking {row['unmask_s']:.3f} s; plain {row['plain_server_s']:.3f} s)")
            if flower:
                rows.append(flower_row(label, updates, drop, setup, repeat, row["plain_server_s"], log))
    write_json_atomic(out / "bench.json", {"rows": rows, "numel": numel, "repeat": repeat, "threshold": threshold,
                                           "neighbours": neighbours})
    return rows


def finish_row(row: dict[str, Any], numel: int) -> None:
    """The ratios of a row whose medians are in."""
    row["uplink_vs_fp32"] = row["uplink_bytes_per_client"] / (4 * numel)
    row["overhead_fraction"] = row["overhead_bytes_per_client"] / (row["uplink_bytes_per_client"]
                                                                 - row["overhead_bytes_per_client"])
    row["critical_path_s"] = row["client_s"] + row["server_s"]


def flower_row(shoal_label: str, updates: dict[int, torch.Tensor], drop: set[int], setup: sa.Setup, repeat: int,
               plain_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Flower's SecAgg+ on shoal's row: the same updates, drops, k and t, medians over ``repeat`` rounds."""
    from shoal.bench import flower_secagg

    n, numel = len(updates), setup.numel
    label = shoal_label.replace("secagg-", "flower-", 1)
    arrays = {u: v.numpy().astype(np.float32) for u, v in updates.items()}
    try:
        runs = [flower_secagg.timed_round(arrays, drop, k=setup.k, threshold=setup.threshold,
                                          clip_range=setup.clip_range) for _ in range(repeat)]
    except RuntimeError as err:
        log(f"{label}: {err}")
        return {"label": label, "clients": n, "dropped": len(drop), "note": str(err), "failed": False}
    row: dict[str, Any] = {"label": label, "failed": False, "clients": n, "dropped": len(drop), "numel": numel,
                           "neighbours": flower_secagg.flower_shares(setup.k, n) - 1, "threshold": setup.threshold,
                           "plain_server_s": plain_s, "note": f"Flower {flower_secagg.VERSION} SecAgg+"}
    for key in runs[0]:
        row[key] = statistics.median(r[key] for r in runs)
    finish_row(row, numel)
    log(f"{label}: uplink {row['uplink_vs_fp32']:.3f}x fp32 (int64 words), keys and shares "
        f"{100 * row['overhead_fraction']:.2f}% of it; client {row['client_s']:.3f} s, server {row['server_s']:.3f} s "
        f"(unmasking {row['unmask_s']:.3f} s)")
    return row


def parse_list(text: str, kind: type, what: str) -> list[Any]:
    """``"10,50,100"`` -> [10, 50, 100]; ValueError naming ``what`` otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a comma-separated list of {kind.__name__}s") from None
    if not values:
        raise ValueError(f"{what}: give at least one value")
    return values


def check(clients: list[int], drops: list[float]) -> None:
    for n in clients:
        if not 3 <= n <= 1000:
            raise ValueError(f"--clients: {n} is outside [3, 1000]")
    for d in drops:
        if not 0 <= d <= 0.5 or math.isnan(d):
            raise ValueError(f"--drops: {d} is outside [0, 0.5] (a round needs half its clients)")
