"""The run machinery around a task: batch stream, run guard, checkpoints, data sets, transforms and metrics."""
