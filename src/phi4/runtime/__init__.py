"""Process start-up: launch environment, torch.distributed, Megatron-Core parallel state, seeds."""
