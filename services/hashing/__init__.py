"""Hashing layers that turn continuous embeddings into binary codes."""
from medhash.services.hashing.gbrbm import GBRBM, pretrain_gbrbm

__all__ = ["GBRBM", "pretrain_gbrbm"]
