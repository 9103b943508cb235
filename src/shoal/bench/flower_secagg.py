"""Flower 1.42's SecAgg+ on the same round as ``shoal bench secure``'s, in the same process.

The baseline row beside each of shoal's: Flower's own ``SecAggPlusWorkflow`` (the server) and
``secaggplus_mod`` (each client), unchanged, driven through an in-process grid. Every message
each way is serialised with Flower's protobuf serde and parsed back, as its gRPC transport would
carry it, so the uplink bytes are those of Flower's wire format. The clients' ``fit`` returns the
same update vector shoal's row masks, every client with weight 1, and the clients of ``drop``
leave at the same point (after sharing their secrets, before the masked input).

Time is kept per party as in :func:`shoal.bench.secure.timed_round`: a client's seconds are its
mod's calls plus parsing what it received; the server's are the workflow's wall time less the
clients'. Flower needs ``pip install -e ".[bench-flower]"`` (it pins typer, rich and protobuf
below shoal's: use a separate environment); it is never needed to train.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

import numpy as np

INSTALL_HINT = 'Flower is not installed: pip install -e ".[bench-flower]" (a separate environment is best)'
VERSION = "1.42"


def available() -> str | None:
    """None when Flower's SecAgg+ can run here, else why not."""
    try:
        import flwr
    except ImportError:
        return INSTALL_HINT
    if not flwr.__version__.startswith(VERSION):
        return f"Flower {flwr.__version__} is installed; this baseline drives Flower {VERSION}'s workflow"
    return None


def flower_shares(k: int, n: int) -> int:
    """Flower's ``num_shares`` for shoal's k neighbours: k plus the client itself, odd unless it is everyone."""
    shares = min(n, k + 1)
    return shares + 1 if shares < n and shares % 2 == 0 else shares


def timed_round(updates: dict[int, np.ndarray], drop: set[int], *, k: int, threshold: int,
                clip_range: float) -> dict[str, Any]:
    """One Flower SecAgg+ round over ``updates`` (client -> float32 vector); ``drop`` leave before masking.

    Returns the keys of shoal's :func:`~shoal.bench.secure.timed_round`; ``max_abs_error`` is that of the
    sum (Flower returns the mean: it is scaled back by the survivors).
    """
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.server_config import ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
    from flwr.serverapp.grid import Grid
    from flwr.supercore.task_identity import TaskIdentity

    # Flower's messages take their run and sender from the process's task identity.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    node = {u: u + 1 for u in updates}  # Flower's node ids; 0 is the server
    client_of = {v: u for u, v in node.items()}
    late_stages = (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)

    def context(node_id: int) -> Context:
        return Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})

    def carried(message: Message) -> tuple[Message, int]:
        data = message_to_proto(message).SerializeToString()
        return message_from_proto(ProtoMessage.FromString(data)), len(data)

    def fit(message: Message, ctx: Context) -> Message:
        update = updates[client_of[ctx.node_id]]
        res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([update]), num_examples=1,
                     metrics={})
        return Message(compat.fitres_to_recorddict(res, False), reply_to=message)

    class InProcessGrid(Grid):
        """Hands each message to its client's mod in this process; bytes and seconds kept per client."""

        def __init__(self) -> None:
            self.contexts = {v: context(v) for v in node.values()}
            self.spent = {v: 0.0 for v in node.values()}
            self.up = {v: 0 for v in node.values()}
            self.masked = 0

        def set_run(self, run: Any) -> None:
            pass

        @property
        def run(self) -> Any:
            return None

        def create_message(self, *args: Any, **kwargs: Any) -> Message:
            raise NotImplementedError("SecAggPlusWorkflow builds its own messages")

        def get_node_ids(self) -> list[int]:
            return list(node.values())

        def push_messages(self, messages: Any) -> Any:
            raise NotImplementedError("only send_and_receive is used")

        def pull_messages(self, message_ids: Any) -> Any:
            raise NotImplementedError("only send_and_receive is used")

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
            replies = []
            for message in messages:
                message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
                dst = message.metadata.dst_node_id
                stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                if client_of[dst] in drop and stage in late_stages:
                    continue
                t = time.perf_counter()
                received, _ = carried(message)
                reply = secaggplus_mod(received, self.contexts[dst], fit)
                reply, size = carried(reply)
                self.spent[dst] += time.perf_counter() - t
                self.up[dst] += size
                if stage == Stage.COLLECT_MASKED_VECTORS:
                    self.masked += size
                replies.append(reply)
            return replies

    grid = InProcessGrid()
    manager = SimpleClientManager()
    for v in node.values():
        manager.register(GridClientProxy(v, grid, 1))
    n = len(updates)
    strategy = FedAvg(fraction_fit=1.0, min_fit_clients=2, min_available_clients=n,
                      fit_metrics_aggregation_fn=lambda metrics: {})
    ctx = LegacyContext(context(0), config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: 1})
    zeros = np.zeros_like(next(iter(updates.values())))
    ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([zeros]), True)
    workflow = SecAggPlusWorkflow(num_shares=flower_shares(k, n), reconstruction_threshold=threshold,
                                  clipping_range=clip_range)
    unmask = workflow.unmask_stage
    unmask_s = [0.0]

    def timed_unmask(g: Grid, c: LegacyContext, state: Any) -> bool:
        before, t = sum(grid.spent.values()), time.perf_counter()
        done = unmask(g, c, state)
        unmask_s[0] = time.perf_counter() - t - (sum(grid.spent.values()) - before)
        return done

    workflow.unmask_stage = timed_unmask  # type: ignore[method-assign]
    t = time.perf_counter()
    workflow(grid, ctx)
    wall = time.perf_counter() - t
    survivors = [node[u] for u in updates if u not in drop]
    result = parameters_to_ndarrays(compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD],
                                                                     keep_input=True))[0]
    if np.array_equal(result, zeros):
        raise RuntimeError("Flower's SecAgg+ round did not aggregate (see its log above)")
    plain = sum(updates[client_of[v]].astype(np.float64) for v in survivors)
    uplink = statistics.median(grid.up[v] for v in survivors)
    return {"client_s": statistics.median(grid.spent[v] for v in survivors),
            "server_s": wall - sum(grid.spent.values()), "unmask_s": unmask_s[0],
            "uplink_bytes_per_client": uplink, "overhead_bytes_per_client": uplink - grid.masked / len(survivors),
            "max_abs_error": float(np.abs(result.astype(np.float64) * len(survivors) - plain).max()),
            "survivors": len(survivors), "bits": 64}
