"""Privacy mechanisms that wrap a federated strategy (they never subclass one):
client-level DP-FedAvg with fixed or adaptive clipping (``dp_fedavg``). The
mechanism-free maths (clipping, the accountant) is in :mod:`shoal.privacy`."""
