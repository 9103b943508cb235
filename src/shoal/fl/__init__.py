"""Federated learning: a server and clients over gRPC, the standard algorithms, and a fast simulation."""
