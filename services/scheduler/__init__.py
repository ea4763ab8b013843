"""The scheduler service: the public `Tandem` API in front of decode and prefill workers.

It tokenizes, routes each request to a decode worker (and a prefill worker, or none),
detokenizes the token stream and applies stop strings. It never loads torch.
"""
