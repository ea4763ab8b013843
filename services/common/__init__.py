"""Plumbing every service shares: the gRPC server shell, error mapping, protobuf conversion."""
