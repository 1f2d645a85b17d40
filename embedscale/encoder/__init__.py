"""Encoders: backbone loading, pooling (pure functions), the BiEncoder."""
