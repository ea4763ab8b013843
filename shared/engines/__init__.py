"""Engines other than Tandem's own (shared/engine): each adapts a third-party runtime to the
engine interface of shared/engine/interface.py. Nothing here imports grpc."""
