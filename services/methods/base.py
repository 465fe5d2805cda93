"""The interface every hashing method implements, so one training loop, evaluation and service run them all.

A method is a :class:`HashModel` subclass registered in the ``medhash.methods`` entry-point group
(:mod:`medhash.services.registry`), with its parameters in a ``Params`` section. It maps frozen
backbone features to float embeddings (``embed_image`` / ``embed_text``, the "float" rows of the
results) and those to binary codes at each code length (``hash_probs`` > 0.5). Training is a list of
stages, one per epoch (``schedule``); each step gets a global batch and returns the loss
(``batch_loss``). A method without gradient training (e.g. CCA-ITQ) has the single stage ``"fit"``
and implements ``fit`` on the whole train split instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medhash.services.config import LLM_READER, MedhashConfig, Section, check_code_length
from medhash.services.errors import ConfigError, WeightsError

FIT = "fit"  # the stage of closed-form methods


@dataclass
class Batch:
    """One global training batch, the same on every worker.

    ``z`` image features [B, image_dim], ``t`` text features [B, text_dim] (the report or an
    augmented view of it), ``labels`` multi-hot float [B, C] (all-zero rows: unknown).
    Data-parallel methods may embed only ``z[local]`` / ``t[local]`` on this worker and ``gather``
    the results (differentiably) into the global batch; a method may also ignore both and compute
    on the whole batch: every worker then takes the same step.
    """

    z: Tensor
    t: Tensor
    labels: Tensor
    local: slice
    gather: Callable[[Tensor], Tensor]


class HashModel(nn.Module):
    """Base of every method's model. Subclasses set ``self.bits`` and implement the abstract methods."""

    name: str = ""  # the registry name (``method:`` in a config)
    Params: type[Section] = Section  # the method's hyper-parameters (config ``method_params``), paper defaults
    paper: str = ""  # the publication this method re-implements
    float_stages: tuple[str, ...] = ()  # stages before the codes train (dev scores then use the float embeddings)
    frozen_prefixes: tuple[str, ...] = ()  # state-dict prefixes of frozen pretrained weights, never saved
    accepts_readings: bool = False  # takes the LLM's readings of the texts (text_backbone.name: llm) as text features

    def __init__(self, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int = 0) -> None:
        super().__init__()
        if cfg.text_backbone.name == LLM_READER and not self.accepts_readings:
            raise ConfigError(
                f"text_backbone.name: {LLM_READER} (the LLM reads the report) is LSCH's; {self.name} needs a sentence "
                "encoder such as all-MiniLM-L6-v2"
            )
        self.cfg = cfg
        self.bits = cfg.codes.bits
        self.params = self.params_of(cfg)

    @classmethod
    def build(cls, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int = 0,
              frozen_weights: bool = True) -> HashModel:
        """The untrained model; ``frozen_weights=False`` skips reading frozen pretrained weights
        (``frozen_prefixes``), for a process that only hashes embeddings. Methods with such weights override it."""
        return cls(cfg, image_dim, text_dim, n_labels)

    @classmethod
    def params_of(cls, cfg: MedhashConfig) -> Section:
        """This method's hyper-parameters: ``cfg.method_params[<name>]`` over the paper defaults."""
        return cls.Params.model_validate(cfg.method_params.get(cls.name, {}))

    # --- inference -----------------------------------------------------------------------------
    def embed_image(self, z: Tensor) -> Tensor:
        """Float embedding [B, d] of image features."""
        raise NotImplementedError

    def embed_text(self, t: Tensor) -> Tensor:
        """Float embedding [B, d] of text features."""
        raise NotImplementedError

    def frozen_llm(self):
        """(model, tokenizer) of the frozen LLM the method embeds through, for a text encoder to share; None here."""
        return None

    def hash_probs(self, v: Tensor, bits: int) -> Tensor:
        """p(bit = 1) [B, bits] of embeddings ``v``; the code is ``hash_probs > 0.5``."""
        raise NotImplementedError

    def code_slice(self, v: Tensor, bits: int) -> Tensor:
        """The ``bits``-bit part of an embedding that holds every code length's outputs side by side
        (in ascending order of length), for methods whose float embedding is their relaxed codes."""
        check_code_length(bits, self.bits)
        start = sum(b for b in self.bits if b < bits)
        return v[:, start : start + bits]

    def codes(self, v: Tensor, bits: int) -> Tensor:
        """Binary codes, bool [B, bits]."""
        check_code_length(bits, self.bits)
        with torch.no_grad():
            return self.hash_probs(v, bits) > 0.5

    # --- training ------------------------------------------------------------------------------
    @classmethod
    def schedule(cls, cfg: MedhashConfig) -> list[str]:
        """The stage of every epoch (default: ``train.epochs`` epochs of stage "joint")."""
        return ["joint"] * cfg.train.epochs

    def batch_loss(self, stage: str, batch: Batch, cfg: MedhashConfig) -> tuple[Tensor, dict[str, float]]:
        """The loss of one global batch in ``stage`` and its named parts (floats, for the history)."""
        raise NotImplementedError

    def fit(self, z: Tensor, t: Tensor, labels: Tensor) -> None:
        """Closed-form training on the whole train split (methods whose schedule is ``["fit"]``)."""
        raise NotImplementedError

    # --- checkpoints -----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def state_dict_trainable(self) -> dict[str, Tensor]:
        """What a run directory stores: everything but frozen pretrained weights (``frozen_prefixes``)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {
            name: tensor.detach()
            for name, tensor in self.state_dict().items()
            if name in trainable or not name.startswith(self.frozen_prefixes)
        }

    def load_state_dict_trainable(self, state: dict[str, Tensor], assign: bool = False) -> None:
        """Load what :meth:`state_dict_trainable` saved; refuse missing, extra or reshaped tensors.

        ``assign`` takes the saved tensors themselves (their device; also into a model built without weights).
        """
        expected = self.state_dict_trainable()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or reshaped:
            raise WeightsError(
                f"{type(self).__name__} weights do not match this configuration: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {reshaped[:5]}"
            )
        self.load_state_dict(state, strict=False, assign=assign)
