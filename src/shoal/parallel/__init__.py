"""Model parallelism: partitioning, profiling and planning."""
