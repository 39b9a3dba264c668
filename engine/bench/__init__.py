"""`vade bench`: per-stage throughput of the real scan, a peer-style baseline, machine ceilings, cost curves."""
