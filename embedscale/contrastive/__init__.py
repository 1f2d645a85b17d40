"""Contrastive training: losses (functions of embeddings), optimizer, the LightningModule, callbacks."""
