"""What every way of training shares, below the strategies that use it.

The optimiser and its schedule (``optim``), evaluation (``evaluate``), atomic
checkpoints (``checkpoint``), the process-group wrapper (``group``) and sparse
training's masks (``sparsity``). ``strategies``, ``ps``, ``fl``, ``compress``,
``parallel`` and ``bench`` build on these; only ``training``'s loop sits above
them all.
"""
