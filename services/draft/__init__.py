"""The draft service: a small model proposing tokens for the decode workers' speculative decoding."""
