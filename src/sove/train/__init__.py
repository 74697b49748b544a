"""Pretraining: schedules, optimizer pieces, checkpoints, the Fabric training loop."""
