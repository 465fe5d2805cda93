"""LSCH, stages 2-4 of docs/method.md, on frozen cached backbone features, and its training losses.

Our reading of the method:

- inputs are frozen backbone features: image Z [B, image_dim] (EfficientNet-Lite0 pooled) and
  text features [B, text_dim] (MiniLM, for reports and their augmented views);
- **structured encoding layer** (image, stage 2): Z -> X, ``m_img_tokens`` tokens in the LLM's
  input-embedding space: LayerNorm, a two-layer MLP (``encoder_hidden`` wide; 0: one linear map) to m * d,
  reshape, learned token-position
  embeddings, then a LayerNorm scaled to the RMS of the LLM's own input embeddings, so X looks
  like a short "sentence" to the LLM. Ablation off: one plain linear map Z -> one token;
- **LLM encoding layer** (text): text features -> Y, ``m_txt_tokens`` tokens, the same structure; or, with
  ``text_backbone.name: llm``, no encoding layer: the LLM reads the report's own tokens (cached once per text,
  :mod:`~medhash.services.backbones.reader`) and the prompts follow it (:meth:`PromptedLLM.read`); the text
  side's trainable layer then comes after the LLM (:class:`~medhash.services.methods.layers.StandardizedMLP`,
  ``encoder_hidden`` wide): each coordinate of the pooled reading standardised over the items, which removes
  the prompt's constant share of it, then an MLP, as the image side has its MLP before the LLM;
- **prompt-tuned LLM alignment** (stage 3, :class:`~medhash.services.methods.prompted_llm.PromptedLLM`): the frozen
  LLM reads [BOS, soft prompt, hard prompt, x or y tokens]; v^x / v^y = its pooled last hidden
  state. Ablation "LLM off": v = a linear map of the mean of the x / y tokens;
- **GBRBM hashing** (stage 4): v is standardised by a learned LayerNorm (the Gaussian visible units
  expect unit-scale data), then one GBRBM per code length gives p(h | v); code = 1[p(h | v) > 0.5].
  Ablation "GBRBM off": p = sigmoid(linear(v)), i.e. code = sign of a linear layer, relaxed
  during training as u = 2p - 1 = tanh(linear(v) / 2).

Only projections, prompts and heads train; :meth:`LSCH.state_dict_trainable` holds exactly
those (never the frozen LLM), for the run directory's safetensors file.

Training (our reading of method.md), on relaxed codes u = 2 p(h | v) - 1 (terms in
:mod:`medhash.services.methods.losses`).

Per code length K, summed over the model's code lengths:

    L = contrastive(u^x, u^y) + label_weight * label(u^x, u^y) + alpha * manifold(u^x, u^y; S_ma)
        + similarity_weight * similarity(u^x, u^y; S_feat) + beta * (quantisation + balance)

- **contrastive** — symmetric InfoNCE over cosine(u^x_i, u^y_j) / tau, the pair (i, i) positive.
  Items that count as false negatives of i (``false_negatives``: any shared label, the identical
  label set, or none; none by default, the label term keeps label-sharing pairs together) are masked
  out. **Hard negative mining** re-weights the remaining negatives by their difficulty
  (Robinson et al. 2021): w_ij = N_i * softmax_j(strength * logit_ij) over i's N_i negatives, so
  the weights average 1 and the most similar negatives count most; strength 0 (ablation off) gives
  plain InfoNCE with the same false-negative masking.
- **manifold** — S_ma in [0, 1] from labels (cosine of multi-hot vectors) where both items have
  labels, blended with a cross-modal kNN graph over the frozen features (and the graph alone where
  labels are unknown); code inner products u_i . u_j / K, mapped to [0, 1], regress onto S_ma
  across modalities plus, at half weight each, within each modality.
- **similarity** (weight ``similarity_weight``, 10 by default): code cosines, across and within modalities,
  regress onto the frozen features' joint cosine (batch-centred, times ``similarity_scale``, clipped to
  [-1, 1]; DJSRH's target). It needs no labels and is meant to keep the backbone's neighbourhoods where
  the instance term alone overfits the training pairs. On MedPix's dev split it lowered labels MAP of the
  label-free mode at every weight tried (at tau 1, weight 1 traded 2-3.5 points of it for 11-12 points of
  pair recall), so label-free configs switch it off; with labels, weight 10 beside a label term of weight 50 was
  MedPix dev's choice and on the query split raised pair recall by 3-6 points with labels and topic MAP the same
  or higher; on COVID's dev split it made no difference (docs/results.md).
- **quantisation** |u| -> 1 and **bit balance** (each bit's batch mean -> 0).
- **label** (weight ``label_weight``, 50 by default): every cross-modal pair (i, j) of the batch
  scored against its labels, BCE(sigmoid(label_scale * cos(u^x_i, u^y_j)), S_ij), with S_ij 1 for
  pairs that share a label ("shared") or the cosine of the label vectors ("graded", so the same
  region with another diagnosis is a weaker match than the same diagnosis); unlike the false-negative
  mask, it pushes apart what the labels separate. With ``label_balanced`` the related and the unrelated
  pairs weigh half each, whatever their share of the batch. ``label_within`` > 0 adds the pairs within each
  modality at that share of the weight, against the label-vector cosine (off: on MedPix's dev split it made no
  difference the seeds separate; docs/results.md). In stage A it acts on v^x, v^y as well.
- **classification** (weight gamma, ``classification_weight``; off by default): a linear classifier
  per code length predicts each item's labels from u^x and u^y (binary cross-entropy over items with
  labels), as MSACH's linear classification constraint: every label, however rare, shapes the codes
  (off: beside the label term, on MedPix's dev split at weight 1 it traded topic MAP I2T for pair recall T2I;
  docs/results.md, "A label classifier on the codes").

The defaults, as a set, beat the previous ones on MedPix's dev split over 3 seeds (docs/results.md,
"Tuning on dev"): the label term (at weight 50 beside the similarity term at 10, chosen later on dev, "Pair
recall beside the label term") with plain InfoNCE, no manifold term (alpha 0) and beta 0.1 (the evaluation notes' floor recipe;
the paper's small-set I2T pair is alpha 0.5, beta 0.8), MLP encoding layers, and no CD pre-training (stage B
lowered topic MAP and tripled the T2I seed spread). Our terms are not the paper's (unpublished) ones, so they
are our reading, not a reproduction.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medhash.services.backbones.llm import load_causal_lm
from medhash.services.config import LLM_READER, MedhashConfig, Section, check_code_length
from medhash.services.errors import ConfigError
from medhash.services.methods.base import Batch, HashModel
from medhash.services.methods.gbrbm import GBRBM
from medhash.services.methods.layers import LinearToken, StandardizedMLP, TokenProjection
from medhash.services.methods.losses import (
    balance_loss,
    classification_loss,
    contrastive_loss,
    feature_similarity,
    manifold_loss,
    manifold_similarity,
    pair_features,
    pairwise_label_loss,
    quantization_loss,
    similarity_preserving_loss,
)
from medhash.services.methods.prompted_llm import PromptedLLM


class LSCHParams(Section):
    """LSCH's parameters (``method_params.lsch``): stages, ablation switches, architecture and losses."""

    # stages A and B are off by default: on MedPix dev (3 seeds) CD pre-training lowered topic MAP and
    # tripled the T2I seed spread (docs/results.md, "Tuning on dev")
    align_epochs: int = Field(0, ge=0)  # stage A: align v^x, v^y (float contrastive), GBRBM untouched
    rbm_epochs: int = Field(0, ge=0)  # stage B: CD-k pre-training of the GBRBM heads on frozen v
    # stage C, joint fine-tuning through p(h|v), runs train.epochs
    # ablation switches (method.md: switch off one at a time)
    use_structured_encoding: bool = True  # off: one plain linear map Z -> one LLM token
    use_soft_prompt: bool = True
    use_hard_prompt: bool = True
    use_llm: bool = True  # off: v = linear map of the pooled x / y tokens, no LLM
    use_gbrbm: bool = True  # off: code = sign of a linear layer (tanh relaxation in training)
    hard_negative_mining: bool = True  # off: plain InfoNCE
    # architecture
    m_img_tokens: int = Field(4, ge=1)  # tokens X per image in the LLM embedding space
    m_txt_tokens: int = Field(4, ge=1)  # tokens Y per report
    n_virtual_tokens: int = Field(8, ge=1)  # soft prompt length
    encoder_hidden: int = Field(512, ge=0)  # > 0: the encoding layers are two-layer MLPs of this width (0: linear)
    pooling: Literal["mean", "last"] = "mean"  # v = mean over the x / y positions, or the last one
    image_prompt: str = "Represent this medical image for retrieval of matching radiology reports:"
    text_prompt: str = "Represent this radiology report for retrieval of matching medical images:"
    lora_rank: int = Field(0, ge=0)  # > 0: LoRA adapters (peft) on the LLM attention projections
    embed_dim: int = Field(640, ge=8)  # width of v when no LLM is loaded (use_llm off)
    # losses
    tau: float = Field(0.1, gt=0)  # InfoNCE temperature
    alpha: float = Field(0.0, ge=0)  # manifold-similarity weight (the paper's small-set I2T 0.5; the floor recipe's 0)
    beta: float = Field(0.1, ge=0)  # quantisation + bit-balance weight (the paper's 0.8; the floor recipe's 0.1)
    hard_negative_strength: float = Field(0.5, ge=0)  # beta_h of the negatives' weights exp(beta_h * logit)
    # which items the contrastive term never pushes apart from item i (besides its own pair):
    # "shared_label" any label in common, "same_labels" the identical label set, "none" nobody
    false_negatives: Literal["shared_label", "same_labels", "none"] = "none"
    classification_weight: float = Field(0.0, ge=0)  # gamma: codes linearly predict the labels (0: off)
    # the pairwise label term: every cross-modal pair of the batch scored against its labels (0: off)
    label_weight: float = Field(50.0, ge=0)  # beside the similarity term; dev's choice, 3 seeds (docs/results.md)
    label_scale: float = Field(5.0, gt=0)  # sigmoid(label_scale * cosine) is the pair's predicted relevance
    label_balanced: bool = False  # related and unrelated pairs weigh half each, whatever their share of the batch
    label_target: Literal["shared", "graded"] = "shared"  # any shared label = 1, or the label-vector cosine
    # weight of each within-modal label term (u^x with u^x, u^y with u^y), whose target is always "graded"
    label_within: float = Field(0.0, ge=0)
    similarity_weight: float = Field(10.0, ge=0)  # code cosines onto the frozen features' joint cosine (0: off)
    similarity_scale: float = Field(1.5, gt=0)  # the feature cosine's scale before clipping (DJSRH's mu)
    knn_k: int = Field(5, ge=1)  # neighbours of the feature kNN graph in S_ma
    manifold_label_weight: float = Field(0.8, ge=0, le=1)  # share of label cosine in S_ma where labels exist
    gbrbm_cd_k: int = Field(1, ge=1)  # Gibbs steps of CD-k pre-training


class LSCH(HashModel):
    """Image / text features -> v^x / v^y -> p(h | v) per code length -> binary codes."""

    name = "lsch"
    Params = LSCHParams
    paper = "LLM-driven semantic mining cross-modal hashing (docs/method.md)"
    float_stages = ("align",)  # stages before the hashing heads train (dev scores use float v)
    frozen_prefixes = ("prompted.llm.",)  # the frozen LLM is loaded from its package, never saved
    accepts_readings = True  # text_backbone.name: llm (PromptedLLM.read)

    def __init__(
        self,
        cfg: MedhashConfig,
        image_dim: int,
        text_dim: int,
        n_labels: int = 0,
        llm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        """The frozen LLM is ``cfg.llm`` loaded here, or ``llm`` / ``tokenizer`` when given (tests, or an
        LLM already loaded); it is frozen in place. With ``classification_weight`` > 0 and ``n_labels``
        labels, each code length gets a linear label classifier on its relaxed codes (a training-time
        constraint; codes never depend on it)."""
        super().__init__(cfg, image_dim, text_dim, n_labels)
        p = self.params
        self.prompted: PromptedLLM | None = None
        self.llm_reads_text = cfg.text_backbone.name == LLM_READER
        if self.llm_reads_text and (not p.use_llm or p.lora_rank):
            raise ConfigError(
                f"text_backbone.name: {LLM_READER} needs method_params.lsch.use_llm: true and lora_rank: 0 "
                "(the report is read once by the frozen LLM)"
            )
        if p.use_llm:
            if llm is None:
                llm, tokenizer = load_causal_lm(cfg.llm)
            self.prompted = PromptedLLM(
                llm,
                tokenizer,
                hard_prompts={
                    "image": p.image_prompt if p.use_hard_prompt else "",
                    "text": p.text_prompt if p.use_hard_prompt else "",
                },
                n_virtual_tokens=p.n_virtual_tokens if p.use_soft_prompt else 0,
                pooling=p.pooling,
                lora_rank=p.lora_rank,
                seed=cfg.train.seed,  # the soft prompt's initial tokens follow the run's seed
            )
            dim, token_scale = self.prompted.hidden_size, self.prompted.token_scale
        else:
            dim, token_scale = p.embed_dim, 1.0
            self.pool_proj = nn.Linear(dim, dim)
        self.dim = dim
        self.image_tokens = (
            TokenProjection(image_dim, p.m_img_tokens, dim, token_scale, p.encoder_hidden)
            if p.use_structured_encoding
            else LinearToken(image_dim, dim)
        )
        if self.llm_reads_text:
            self.reading_head = StandardizedMLP(dim, p.encoder_hidden)
        else:
            self.text_tokens = TokenProjection(text_dim, p.m_txt_tokens, dim, token_scale, p.encoder_hidden)
        self.visible_norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict(
            {str(b): GBRBM(dim, b) if p.use_gbrbm else nn.Linear(dim, b) for b in self.bits}
        )
        self.classifiers = nn.ModuleDict(
            {str(b): nn.Linear(b, n_labels) for b in self.bits} if p.classification_weight > 0 and n_labels else {}
        )

    @classmethod
    def build(cls, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int = 0,
              frozen_weights: bool = True) -> LSCH:
        """LSCH with its frozen LLM; without ``frozen_weights`` the LLM has its shapes but no weights."""
        if not frozen_weights and cls.params_of(cfg).use_llm:
            llm, tokenizer = load_causal_lm(cfg.llm, weights=False)
            return cls(cfg, image_dim, text_dim, n_labels, llm=llm, tokenizer=tokenizer)
        return cls(cfg, image_dim, text_dim, n_labels)

    def _pool(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        if self.prompted is not None:
            return self.prompted(tokens, modality)
        return self.pool_proj(tokens.mean(dim=1))

    def embed_image(self, z: torch.Tensor) -> torch.Tensor:
        """v^x [B, d] from image features z [B, image_dim]."""
        return self._pool(self.image_tokens(z), "image")

    def embed_text(self, t: torch.Tensor) -> torch.Tensor:
        """v^y [B, d] from text features t [B, text_dim] (with the LLM reading: the texts' readings)."""
        if self.llm_reads_text:
            return self.reading_head(self.prompted.read(t))
        return self._pool(self.text_tokens(t), "text")

    def frozen_llm(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
        """The frozen LLM and its tokenizer (None with the LLM ablated)."""
        return (self.prompted.llm, self.prompted.tokenizer) if self.prompted is not None else None

    def _head(self, bits: int) -> nn.Module:
        return self.heads[str(check_code_length(bits, self.bits))]

    def visible(self, v: torch.Tensor) -> torch.Tensor:
        """v standardised for the hashing heads (the GBRBM's visible units)."""
        return self.visible_norm(v)

    def hash_probs(self, v: torch.Tensor, bits: int) -> torch.Tensor:
        """p(h = 1 | v) [B, bits]: GBRBM hidden probabilities, or sigmoid of the linear head."""
        head = self._head(bits)
        if isinstance(head, GBRBM):
            return head.hidden_probs(self.visible(v))
        return torch.sigmoid(head(self.visible(v)))

    def gbrbm_pretrain_loss(self, v: torch.Tensor) -> torch.Tensor:
        """CD-k surrogate summed over the GBRBM heads, on standardised and detached v (the data)."""
        if not self.params.use_gbrbm:
            raise ConfigError("GBRBM pre-training needs method_params.lsch.use_gbrbm: true")
        data = self.visible(v).detach()
        return sum(self.heads[str(b)].cd_loss(data, self.params.gbrbm_cd_k) for b in self.bits)

    @classmethod
    def schedule(cls, cfg: MedhashConfig) -> list[str]:
        """Stage A "align", B "rbm" (only with GBRBM heads), C "joint": the stage of every epoch."""
        p = cls.params_of(cfg)
        return ["align"] * p.align_epochs + ["rbm"] * (p.rbm_epochs if p.use_gbrbm else 0) + ["joint"] * cfg.train.epochs

    def batch_loss(self, stage: str, batch: Batch, cfg: MedhashConfig) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one global batch in ``stage``.

        This worker embeds its share of the batch; the embeddings are gathered so every worker
        scores the whole global batch. The GBRBM stage needs no gathering (CD on local v).
        """
        z, t = batch.z[batch.local], batch.t[batch.local]
        if stage == "rbm":
            with torch.no_grad():
                v = torch.cat([self.embed_image(z), self.embed_text(t)])
            loss = self.gbrbm_pretrain_loss(v)
            with torch.no_grad():
                visible = self.visible(v)
                error = sum(float(self.heads[str(b)].reconstruction_error(visible)) for b in self.bits) / len(self.bits)
            return loss, {"cd": loss.item(), "reconstruction": error, "total": loss.item()}
        vx, vy = batch.gather(self.embed_image(z)), batch.gather(self.embed_text(t))
        if stage == "align":
            return embedding_alignment_loss(vx, vy, batch.labels, self.params)
        return hashing_loss(self, vx, vy, pair_features(batch.z, batch.t), batch.labels, self.params)


def lsch_loss(
    model: LSCH, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, params: LSCHParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """The joint loss of one batch: :func:`hashing_loss` of its embeddings.

    ``z`` image features [B, image_dim], ``t`` text features [B, text_dim] of the paired report
    (or an augmented view of it), ``labels`` multi-hot [B, C] (zero rows or None: unknown).
    """
    return hashing_loss(model, model.embed_image(z), model.embed_text(t), pair_features(z, t), labels, params)


def hashing_loss(
    model: LSCH,
    vx: torch.Tensor,
    vy: torch.Tensor,
    pair_feats: torch.Tensor,
    labels: torch.Tensor | None,
    params: LSCHParams,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The joint loss summed over the model's code lengths; ``parts`` holds each term's value.

    Takes the embeddings v^x, v^y and the frozen pair features rather than the raw batch, so data
    parallel training can gather them from every worker and score the whole global batch.
    """
    strength = params.hard_negative_strength if params.hard_negative_mining else 0.0
    similarity = manifold_similarity(
        labels, labels, pair_feats, pair_feats, params.knn_k, params.manifold_label_weight
    ).to(vx.device)
    terms = {"contrastive": 0.0, "manifold": 0.0, "quantization": 0.0, "balance": 0.0}
    if params.label_weight:
        terms["label"] = 0.0
    if params.similarity_weight:
        terms["similarity"] = 0.0
        feature_sim = feature_similarity(pair_feats, params.similarity_scale).to(vx.device)
    if model.classifiers:
        terms["classification"] = 0.0
    known = labels is not None and bool(model.classifiers) and bool((labels.sum(dim=1) > 0).any())
    for bits in model.bits:
        ux, uy = 2 * model.hash_probs(vx, bits) - 1, 2 * model.hash_probs(vy, bits) - 1
        terms["contrastive"] = terms["contrastive"] + contrastive_loss(
            ux, uy, labels, params.tau, strength, params.false_negatives
        )
        terms["manifold"] = terms["manifold"] + manifold_loss(ux, uy, similarity)
        terms["quantization"] = terms["quantization"] + 0.5 * (quantization_loss(ux) + quantization_loss(uy))
        terms["balance"] = terms["balance"] + 0.5 * (balance_loss(ux) + balance_loss(uy))
        if params.similarity_weight:
            terms["similarity"] = terms["similarity"] + similarity_preserving_loss(ux, uy, feature_sim)
        if params.label_weight:
            terms["label"] = terms["label"] + label_loss(ux, uy, labels, params)
        if known:
            terms["classification"] = terms["classification"] + classification_loss(
                model.classifiers[str(bits)], ux, uy, labels
            )
    total = (
        terms["contrastive"]
        + params.alpha * terms["manifold"]
        + params.beta * (terms["quantization"] + terms["balance"])
        + params.classification_weight * terms.get("classification", 0.0)
        + params.label_weight * terms.get("label", 0.0)
        + params.similarity_weight * terms.get("similarity", 0.0)
    )
    parts = {name: float(torch.as_tensor(value).detach()) for name, value in terms.items()}
    parts["total"] = float(total.detach())
    return total, parts


def label_loss(ux: torch.Tensor, uy: torch.Tensor, labels: torch.Tensor | None, params: LSCHParams) -> torch.Tensor:
    """The label term: every cross-modal pair of the batch against ``label_target``, plus ``label_within`` x each
    within-modal term against the label-vector cosine ("graded": a modality's items that share a region but not
    their other labels keep apart)."""

    def pairs(a: torch.Tensor, b: torch.Tensor, target: str) -> torch.Tensor:
        return pairwise_label_loss(a, b, labels, params.label_scale, target, params.label_balanced)

    cross = pairs(ux, uy, params.label_target)
    if not params.label_within:
        return cross
    return cross + params.label_within * (pairs(ux, ux, "graded") + pairs(uy, uy, "graded"))


def alignment_loss(
    model: LSCH, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, params: LSCHParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """Float-level alignment before hashing: :func:`embedding_alignment_loss` of one batch."""
    return embedding_alignment_loss(model.embed_image(z), model.embed_text(t), labels, params)


def embedding_alignment_loss(
    vx: torch.Tensor, vy: torch.Tensor, labels: torch.Tensor | None, params: LSCHParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """The contrastive loss on v^x, v^y themselves (heads untouched), plus the label term if it is on."""
    strength = params.hard_negative_strength if params.hard_negative_mining else 0.0
    contrastive = contrastive_loss(vx, vy, labels, params.tau, strength, params.false_negatives)
    parts = {"contrastive_v": float(contrastive.detach())}
    loss = contrastive
    if params.label_weight:
        label = label_loss(vx, vy, labels, params)
        parts["label_v"] = float(label.detach())
        loss = loss + params.label_weight * label
    parts["total"] = float(loss.detach())
    return loss, parts
