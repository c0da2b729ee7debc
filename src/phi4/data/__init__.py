"""Data: the Phi-4 tokenizer and the synthetic arithmetic corpus."""
