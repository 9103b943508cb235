"""The training loop: build, start or resume, train, summarise.

(Named ``training`` so that ``shoal.train`` stays the public function.) The
pieces the loop shares with the other ways of training (optimiser, evaluation,
checkpoints, process group, sparse masks) live one layer down, in
:mod:`shoal.engine`.
"""
