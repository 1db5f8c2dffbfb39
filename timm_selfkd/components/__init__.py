"""Reusable pieces the methods compose: float32 KD losses, batch samplers, stochastic depth, the per-sample
soft-target memory, the weight ring, progressive targets and the replayed mixup. No piece imports a method."""
