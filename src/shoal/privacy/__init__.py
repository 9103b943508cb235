"""Differential privacy: DP-FedAvg, clipping, and the privacy accountant that keeps the budget."""
