"""Training: the optimizer and one optimizer step over Megatron-Core's pipeline schedules."""
