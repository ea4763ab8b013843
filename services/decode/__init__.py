"""The decode service: continuous batching over all its requests, prompts prefilled locally or by a peer."""
