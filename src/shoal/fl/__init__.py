"""Federated learning: a server and clients that train one model without pooling their data."""
