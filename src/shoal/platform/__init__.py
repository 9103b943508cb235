"""The training platform for a shared machine: jobs, their gang placement on a node's GPUs (or a
cluster's, in the simulator), and the scheduling policies (:mod:`shoal.platform.policies`, one file each)
that the trace-driven simulator (:mod:`shoal.platform.simulate`) runs exactly as a service would."""
