"""Benchmarks: scripts that print figures (throughput, latency, defence cost); never shipped in the serving image."""
