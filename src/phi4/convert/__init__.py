"""phi4-convert: Hugging Face Phi3ForCausalLM <-> Megatron-Core distributed checkpoints."""
