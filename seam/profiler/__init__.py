"""Measuring and learning: per-block latency and memory on a device, link probes, quality at the cut
(``seam analyze``), the reward surrogate and the PPO training of the learned split policy."""
