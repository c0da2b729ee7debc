"""Generative evaluation: decoding from the Megatron-Core model, checkers, accuracy with confidence
intervals (phi4-eval, and `eval.every` during training); the decoder is shared with Pivotal Token Search."""
