"""The Phi-4 model on Megatron-Core: config mapping, layer spec, builder and weight mapping."""
