"""Aggregation the server cannot read client by client: SecAgg+ (``secagg``) and CKKS (``ckks``)."""
