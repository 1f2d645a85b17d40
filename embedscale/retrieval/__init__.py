"""Retrieval: metrics (pure functions), exact search, evaluators. Never imports contrastive/."""
