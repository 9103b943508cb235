"""The training loop, evaluation, optimisers and atomic checkpoints.

(Named ``training`` so that ``shoal.train`` stays the public function.)
"""
