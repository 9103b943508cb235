"""Parameter-server training on PyTorch RPC: ``async_ps``, ``ssp`` and ``sync:backup=b``.

The parameters are split into S shards of about equal size; shard j lives in
rank j's supervising process (servers share their hosts with workers, as in
MXNet's co-located mode) and holds its parameters, its own optimizer and a
version counter. Every step each worker:

1. computes the gradient of its batch on its replica of the model
2. pushes each shard's slice to that shard's server, through the codec, with
   error feedback kept on the worker
3. gets back the shard's parameters and copies them into its replica

When a push is applied and when its reply is sent is the *policy*: ``async``
(apply on arrival, reply at once; Dean et al. 2012), ``ssp`` (apply on arrival,
hold the reply while the worker is more than s clocks ahead of the slowest; Ho
et al. 2013) or ``backup`` (apply the mean of the first N-b pushes of a version,
drop the rest; Chen et al. 2016). A policy is a small object; the shard and the
RPC plumbing are the same for all.

The modules, from the bottom up:

- :mod:`~shoal.ps.shard`: a shard, its reply, the policy interface, the layout
  of parameters over shards.
- :mod:`~shoal.ps.host`: the RPC functions over the shards this process
  serves, the RPC rendezvous, and :class:`~shoal.ps.host.PsHost`, a rank's
  server side.
- :mod:`~shoal.ps.strategy`: :class:`~shoal.ps.strategy.PsStrategy`, the worker side.
- :mod:`~shoal.ps.proxy` and :mod:`~shoal.ps.supervisor`: each rank is a
  supervising process (the elastic launcher's worker) that hosts the shard and
  RPC membership, and a worker process it starts and restarts, which reaches
  it through a typed proxy. A worker that dies is restarted and rejoins at its
  step count with the current parameters while the others go on; a host that
  dies takes the launcher's group restart, and its shard comes back from its
  last shard checkpoint.
- :mod:`~shoal.ps.async_ps`, :mod:`~shoal.ps.ssp`, :mod:`~shoal.ps.backup`:
  the policies and their strategies (``sync:backup=b`` reaches
  ``BackupSyncStrategy``, the ``backup`` topology ``SyncStrategy.topology`` names).

Sparse training (``prune:``): the shards hold the masks. Rank 0's worker
ranks its replica and sends every shard its part (:meth:`PsHost.set_masks`);
a shard zeroes the pruned entries of each gradient before its optimizer step
and of its parameters after it, and keeps the mask in its checkpoints. Only
kept entries travel: a reply carries the shard's kept parameters (and, when
the mask changed since that worker last heard, the mask, bit-packed), and the
worker's next push carries the gradient of the entries that mask keeps, with
its version, so a shard decodes every push by the mask it was packed under.

Staleness of a push = versions the shard advanced between the worker's pull
and the push's application. Evaluation runs on rank 0 alone, on its replica as
of its last pull, so no worker ever waits for another to evaluate.
"""

