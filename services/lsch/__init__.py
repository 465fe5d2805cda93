"""LSCH: structured encoding, prompt-tuned LLM alignment and GBRBM hashing (stages 2-4), and its losses."""
from medhash.services.lsch.losses import alignment_loss, lsch_loss
from medhash.services.lsch.model import LSCHModel

__all__ = ["LSCHModel", "alignment_loss", "lsch_loss"]
