"""Per-block latency and memory measurements on a device, link probes, and profile files."""
