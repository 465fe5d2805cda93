"""LSCH model and losses: shapes, frozen LLM, ablation switches, checkpoints, loss behaviour, learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from medhash.services.codes import pack_codes
from medhash.services.backbones.llm import tiny_causal_lm
from medhash.services.config import MedhashConfig, load_config
from medhash.services.errors import ConfigError, WeightsError
from medhash.services.methods.gbrbm import GBRBM
from medhash.services.methods.lsch import LSCH, LSCHParams, alignment_loss, label_loss, lsch_loss
from medhash.services.methods.losses import (
    contrastive_loss,
    false_negative_mask,
    feature_similarity,
    hard_negative_weights,
    label_similarity,
    manifold_similarity,
    pairwise_label_loss,
    similarity_preserving_loss,
)
from medhash.services.evaluation.metrics import hamming_metrics, label_relevance

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE_DIM, TEXT_DIM = 24, 12
FAST = dict(n_virtual_tokens=4, m_img_tokens=2, m_txt_tokens=2, image_prompt="image:", text_prompt="report:")


def lsch_config(bits=(16, 32), **params) -> MedhashConfig:
    return load_config(None, {"codes.bits": bits, "method_params": {"lsch": {**FAST, **params}}})


def build(bits=(16, 32), n_labels: int = 0, **params) -> LSCH:
    torch.manual_seed(0)
    cfg = lsch_config(bits, **params)
    use_llm = LSCH.params_of(cfg).use_llm
    llm, tokenizer = tiny_causal_lm(hidden_size=32) if use_llm else (None, None)
    return LSCH(cfg, IMAGE_DIM, TEXT_DIM, n_labels, llm, tokenizer)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = F.one_hot(torch.arange(n) % 4, 4).float()
    return torch.randn(n, IMAGE_DIM, generator=g), torch.randn(n, TEXT_DIM, generator=g), labels


def test_shapes_and_codes():
    model = build()
    z, t, _ = batch()
    vx, vy = model.embed_image(z), model.embed_text(t)
    assert vx.shape == vy.shape == (8, 32)
    for bits in (16, 32):
        p = model.hash_probs(vx, bits)
        assert p.shape == (8, bits) and ((p > 0) & (p < 1)).all()
        codes = model.codes(vx, bits)
        assert codes.dtype == torch.bool and torch.equal(codes, p > 0.5)
    with pytest.raises(ConfigError, match="64-bit"):
        model.hash_probs(vx, 64)


def test_the_soft_prompt_starts_from_the_runs_seed():
    def soft_prompt(seed: int) -> torch.Tensor:
        llm, tokenizer = tiny_causal_lm(hidden_size=32)  # the same LLM weights every time
        cfg = load_config(None, {"codes.bits": (16,), "train.seed": seed, "method_params": {"lsch": FAST}})
        return LSCH(cfg, IMAGE_DIM, TEXT_DIM, 0, llm, tokenizer).prompted.soft_prompt.detach()

    assert torch.equal(soft_prompt(1), soft_prompt(1))
    assert not torch.equal(soft_prompt(0), soft_prompt(1))


def test_llm_is_frozen_and_only_prompts_projections_heads_train():
    model = build()
    llm_before = {n: p.detach().clone() for n, p in model.prompted.llm.named_parameters()}
    assert not any(p.requires_grad for p in model.prompted.llm.parameters())
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    assert not model.prompted.llm.training and model.image_tokens.training
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    loss, _ = lsch_loss(model, *batch(), model.params)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, llm_before[n]) for n, p in model.prompted.llm.named_parameters())
    after = dict(model.named_parameters())
    for name in ("prompted.soft_prompt", "image_tokens.proj.0.weight", "text_tokens.proj.2.weight", "heads.16.W"):
        assert not torch.equal(after[name], trainable_before[name]), name
    assert set(trainable_before) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "switch",
    ["use_structured_encoding", "use_soft_prompt", "use_hard_prompt", "use_llm", "use_gbrbm", "hard_negative_mining"],
)
def test_each_ablation_builds_and_backpropagates(switch):
    model = build(**{switch: False})
    z, t, labels = batch()
    loss, parts = lsch_loss(model, z, t, labels, model.params)
    loss.backward()
    assert np.isfinite(parts["total"]) and set(parts) >= {"contrastive", "manifold", "quantization", "balance"}
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if switch == "use_structured_encoding":
        assert model.image_tokens(z).shape == (8, 1, 32)
    elif switch == "use_soft_prompt":
        assert model.prompted.soft_prompt is None
    elif switch == "use_hard_prompt":
        assert model.prompted.prefix("image").shape[0] == 1 + 4  # BOS + soft prompt
    elif switch == "use_llm":
        assert model.prompted is None and model.embed_image(z).shape == (8, model.params.embed_dim)
    elif switch == "use_gbrbm":
        assert not any(isinstance(h, GBRBM) for h in model.heads.values())
        with pytest.raises(ConfigError):
            model.gbrbm_pretrain_loss(model.embed_image(z))


def test_classification_constraint_trains_label_classifiers_on_the_codes():
    model = build(n_labels=4, classification_weight=1.0, use_llm=False)
    assert set(model.classifiers) == {"16", "32"} and model.classifiers["16"].in_features == 16
    z, t, labels = batch()
    labels[0] = 0  # an item without labels takes no part in the term
    loss, parts = lsch_loss(model, z, t, labels, model.params)
    loss.backward()
    assert parts["classification"] > 0 and model.classifiers["32"].weight.grad.abs().sum() > 0
    without = build(n_labels=4, classification_weight=0.0, use_llm=False)
    assert not without.classifiers and "classification" not in lsch_loss(without, z, t, labels, without.params)[1]
    assert set(model.state_dict_trainable()) - set(without.state_dict_trainable()) == {
        f"classifiers.{b}.{w}" for b in (16, 32) for w in ("weight", "bias")
    }


def test_cached_prefix_equals_the_full_sequence():
    """The shared-prefix KV cache must give the same v and soft-prompt gradient as one long sequence."""
    for pooling in ("mean", "last"):
        prompted = build(pooling=pooling).prompted
        tokens = torch.randn(5, 3, 32, requires_grad=True)
        prefix = prompted.prefix("text")
        sequence = torch.cat([prefix.expand(5, -1, -1), tokens], dim=1)
        hidden = prompted.llm.base_model(inputs_embeds=sequence, use_cache=False).last_hidden_state[:, -3:]
        full = hidden.mean(dim=1) if pooling == "mean" else hidden[:, -1]
        cached = prompted(tokens, "text")
        assert torch.allclose(cached, full, atol=1e-5)
        (grad_full,) = torch.autograd.grad(full.square().sum(), prompted.soft_prompt)
        (grad_cached,) = torch.autograd.grad(cached.square().sum(), prompted.soft_prompt)
        assert grad_full.abs().max() > 0 and torch.allclose(grad_cached, grad_full, atol=1e-4, rtol=1e-3)


def test_lora_and_last_token_pooling_run():
    model = build(lora_rank=2, pooling="last")
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(n in model.state_dict_trainable() for n in lora)
    loss, _ = lsch_loss(model, *batch(), model.params)
    loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in lora)


def test_the_configured_llm_is_loaded_and_missing_weights_are_named(tmp_path):
    cfg = load_config(None, {"llm.name": "tiny-random", "method_params": {"lsch": FAST}})
    assert LSCH(cfg, IMAGE_DIM, TEXT_DIM).prompted is not None
    with pytest.raises(WeightsError, match="no-such-llm"):
        LSCH(load_config(None, {"llm.name": str(tmp_path / "no-such-llm")}), IMAGE_DIM, TEXT_DIM)


def test_gbrbm_pretrain_loss_trains_heads_only():
    model = build()
    v = model.embed_image(batch()[0])
    loss = model.gbrbm_pretrain_loss(v)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.heads["16"].W.grad is not None
    assert all(p.grad is None for p in model.image_tokens.parameters())


def test_state_dict_trainable_round_trip(tmp_path):
    model = build()
    with torch.no_grad():
        model.prompted.soft_prompt.add_(1.0)
        model.heads["32"].a.add_(0.3)
    state = model.state_dict_trainable()
    assert not any(name.startswith("prompted.llm.") for name in state)
    save_file(state, tmp_path / "lsch.safetensors")
    restored = build()
    with torch.no_grad():  # make every trained tensor differ, so only loading can restore it
        for param in restored.trainable_parameters():
            param.add_(torch.randn_like(param))
    restored.load_state_dict_trainable(load_file(tmp_path / "lsch.safetensors"))
    z, t, _ = batch()
    with torch.no_grad():
        for bits in (16, 32):
            assert torch.equal(model.codes(model.embed_image(z), bits), restored.codes(restored.embed_image(z), bits))
            expected = model.hash_probs(model.embed_text(t), bits)
            assert torch.allclose(restored.hash_probs(restored.embed_text(t), bits), expected)
    with pytest.raises(WeightsError, match="missing"):
        build(bits=(16, 32, 64)).load_state_dict_trainable(state)


def test_hard_negative_weights_favour_the_most_similar_negative():
    logits = torch.tensor([[5.0, 4.0, 1.0, -2.0]])
    negatives = torch.tensor([[False, True, True, True]])
    plain = hard_negative_weights(logits, negatives, 0.0)
    mild, strong = hard_negative_weights(logits, negatives, 0.5), hard_negative_weights(logits, negatives, 1.0)
    assert torch.allclose(plain, torch.tensor([[0.0, 1.0, 1.0, 1.0]]))
    assert plain[0, 1] < mild[0, 1] < strong[0, 1] and mild[0, 3] < plain[0, 3]
    assert mild[0, 0] == 0 and torch.isclose(mild[0, 1:].mean(), torch.tensor(1.0))


def test_contrastive_loss_plain_infonce_masking_and_hard_negatives():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.2
    target = torch.arange(6)
    plain = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    assert torch.isclose(contrastive_loss(a, b, None, 0.2, 0.0), plain, atol=1e-5)
    # every item shares a label: nothing is a negative, only the positive is left
    same = torch.ones(6, 1)
    assert contrastive_loss(a, b, same, 0.2, 0.5).abs() < 1e-6
    # a label-sharing item is not a negative: its logit leaves the denominators
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [0, 1]]).float()
    false_negative = (labels @ labels.T > 0) & ~torch.eye(6, dtype=torch.bool)
    masked = logits.masked_fill(false_negative, float("-inf"))
    expected = 0.5 * (F.cross_entropy(masked, target) + F.cross_entropy(masked.T, target))
    assert torch.isclose(contrastive_loss(a, b, labels, 0.2, 0.0), expected, atol=1e-5)
    assert contrastive_loss(a, b, labels, 0.2, 0.0) < plain
    # hard-negative weighting raises the loss when one negative is close to the anchor
    hard = b.clone()
    hard[3] = a[0] + 0.05 * torch.randn(10, generator=g)
    assert contrastive_loss(a, hard, None, 0.2, 1.0) > contrastive_loss(a, hard, None, 0.2, 0.0)


def test_false_negative_policies():
    labels = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]]).float()
    shared = false_negative_mask(labels, 5, "shared_label")
    same = false_negative_mask(labels, 5, "same_labels")
    assert shared[0, 1] and shared[0, 2] and not shared[0, 3] and not shared[4].any()
    assert same[0, 1] and not same[0, 2] and not same[2, 0] and same[3, 3] and not same[4].any()
    assert not false_negative_mask(labels, 5, "none").any()
    assert not false_negative_mask(None, 5, "shared_label").any()
    # "none" is plain InfoNCE even when every item shares a label
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert torch.isclose(
        contrastive_loss(a, b, torch.ones(5, 1), 0.2, 0.0, "none"), contrastive_loss(a, b, None, 0.2, 0.0)
    )


def test_label_similarity_shared_and_graded():
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]]).float()
    shared, known = label_similarity(labels, "shared")
    graded, _ = label_similarity(labels, "graded")
    assert shared[0, 1] == 1 and shared[0, 2] == 0 and torch.isclose(graded[0, 0], torch.tensor(1.0))
    assert torch.isclose(graded[0, 1], torch.tensor(2 ** -0.5)) and graded[0, 2] == 0  # region only < same labels
    assert known[:3, :3].all() and not known[3].any() and not known[:, 3].any()


def test_pairwise_label_loss_by_hand_and_its_gradient_separates_label_groups():
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]]).float()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    cosine = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    target = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]]).float()
    expected = F.binary_cross_entropy_with_logits(5 * cosine[:3, :3], target)  # the unlabelled row takes no part
    assert torch.isclose(pairwise_label_loss(a, b, labels, 5.0), expected)
    logits = 5 * cosine[:3, :3]  # balanced: 5 related and 4 unrelated pairs, half the weight each
    related = F.binary_cross_entropy_with_logits(logits[target == 1], torch.ones(5))
    unrelated = F.binary_cross_entropy_with_logits(logits[target == 0], torch.zeros(4))
    assert torch.isclose(pairwise_label_loss(a, b, labels, 5.0, balanced=True), (related + unrelated) / 2)
    one_label = torch.tensor([[1, 0]] * 4).float()  # no unrelated pair: the plain mean
    assert torch.isclose(
        pairwise_label_loss(a, b, one_label, 5.0, balanced=True), pairwise_label_loss(a, b, one_label, 5.0)
    )
    assert pairwise_label_loss(a, b, None, 5.0) == 0 and pairwise_label_loss(a, b, torch.zeros(4, 2), 5.0) == 0
    a.requires_grad_(True)
    pairwise_label_loss(a, b, labels, 5.0).backward()
    step = a.detach() - 0.5 * a.grad
    after = F.normalize(step, dim=1) @ F.normalize(b, dim=1).T
    assert after[0, 1] > cosine[0, 1] and after[0, 2] < cosine[0, 2]  # same label closer, other label apart


def test_the_label_term_within_each_modality_pulls_an_images_label_group_together():
    labels = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]]).float()  # item 3 shares only label 0
    g = torch.Generator().manual_seed(6)  # items 0 and 1 start apart (cosine -0.30)
    ux, uy = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    cross = pairwise_label_loss(ux, uy, labels, 5.0)
    assert torch.isclose(label_loss(ux, uy, labels, LSCHParams()), cross)  # the default: cross-modal pairs only
    within = LSCHParams(label_within=0.5)

    def within_pairs(target):
        return pairwise_label_loss(ux, ux, labels, 5.0, target) + pairwise_label_loss(uy, uy, labels, 5.0, target)

    assert torch.isclose(label_loss(ux, uy, labels, within), cross + 0.5 * within_pairs("graded"))
    assert not torch.isclose(within_pairs("graded"), within_pairs("shared"))  # item 3 against 0 and 1: 0.71, not 1
    ux.requires_grad_(True)
    (label_loss(ux, uy, labels, within) - pairwise_label_loss(ux, uy, labels, 5.0)).backward()
    step = F.normalize(ux.detach() - 0.5 * ux.grad, dim=1)
    before, after = F.normalize(ux.detach(), dim=1) @ F.normalize(ux.detach(), dim=1).T, step @ step.T
    assert after[0, 1] > before[0, 1] and after[0, 2] < before[0, 2]  # the within-modal gradient alone


def test_encoding_layers_are_mlps_when_given_a_hidden_width():
    model = build(use_llm=False, encoder_hidden=16)
    assert [type(m).__name__ for m in model.image_tokens.proj] == ["Linear", "GELU", "Linear"]
    assert model.image_tokens.proj[0].out_features == 16 and model.text_tokens.proj[0].in_features == TEXT_DIM
    z, t, labels = batch()
    assert model.embed_image(z).shape == model.embed_text(t).shape == (8, model.dim)
    assert isinstance(build(use_llm=False, encoder_hidden=0).image_tokens.proj, torch.nn.Linear)  # 0: one linear map


def test_label_term_enters_both_stages_only_when_switched_on():
    z, t, labels = batch()
    model = build(use_llm=False, label_weight=10.0, label_target="graded")
    _, joint = lsch_loss(model, z, t, labels, model.params)
    _, align = alignment_loss(model, z, t, labels, model.params)
    assert joint["label"] > 0 and align["label_v"] > 0
    assert joint["total"] > joint["contrastive"] + 10.0 * joint["label"] - 1e-4
    without = build(use_llm=False, label_weight=0.0)
    assert "label" not in lsch_loss(without, z, t, labels, without.params)[1]
    assert "label_v" not in alignment_loss(without, z, t, labels, without.params)[1]


def test_feature_similarity_is_the_centred_joint_cosine_and_the_term_pulls_codes_onto_it():
    g = torch.Generator().manual_seed(5)
    feats = torch.rand(6, 10, generator=g) + 1.0  # all positive, as ReLU features: raw cosines all high
    s = feature_similarity(feats, scale=1.0)
    centred = F.normalize(feats - feats.mean(dim=0), dim=1)
    assert torch.allclose(s, centred @ centred.T) and (s < 0).any()
    assert feature_similarity(feats, scale=100.0).abs().max() <= 1.0  # scaled, then clipped
    ux, uy = torch.randn(6, 16, generator=g, requires_grad=True), torch.randn(6, 16, generator=g)
    before = similarity_preserving_loss(ux, uy, s)
    cross = F.normalize(ux, dim=1) @ F.normalize(uy, dim=1).T
    expected = (cross - s).pow(2).mean() + 0.5 * (
        (F.normalize(ux, dim=1) @ F.normalize(ux, dim=1).T - s).pow(2).mean()
        + (F.normalize(uy, dim=1) @ F.normalize(uy, dim=1).T - s).pow(2).mean()
    )
    assert torch.isclose(before, expected)
    before.backward()
    assert similarity_preserving_loss(ux.detach() - 2.0 * ux.grad, uy, s) < before


def test_similarity_term_enters_the_joint_loss_only_when_switched_on():
    z, t, labels = batch()
    model = build(use_llm=False, label_weight=0.0, similarity_weight=3.0)
    _, parts = lsch_loss(model, z, t, None, model.params)
    assert parts["similarity"] > 0
    assert parts["total"] > parts["contrastive"] + 3.0 * parts["similarity"] - 1e-4
    without = build(use_llm=False, label_weight=0.0, similarity_weight=0.0)
    assert "similarity" not in lsch_loss(without, z, t, None, without.params)[1]


def test_manifold_similarity_labels_and_knn():
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]]).float()
    feats = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    s = manifold_similarity(labels[:3], labels[:3], feats[:3], feats[:3], k=1, label_weight=1.0)
    expected = F.normalize(labels[:3], dim=1) @ F.normalize(labels[:3], dim=1).T
    assert torch.allclose(s, expected)
    blended = manifold_similarity(labels, labels, feats, feats, k=1, label_weight=0.5)
    graph = manifold_similarity(None, None, feats, feats, k=1, label_weight=0.5)
    assert torch.equal(graph.diagonal(), torch.ones(4))  # each item is its own nearest neighbour
    assert torch.equal(blended[3], graph[3]) and torch.equal(blended[:, 3], graph[:, 3])  # unknown labels
    assert torch.allclose(blended[:3, :3], 0.5 * expected + 0.5 * graph[:3, :3])
    assert ((blended >= 0) & (blended <= 1)).all()


def synthetic_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs from 4 latent classes seen through fixed noisy linear image and text views."""
    views = torch.Generator().manual_seed(123)
    centres = torch.randn(4, 8, generator=views)
    to_image, to_text = torch.randn(8, IMAGE_DIM, generator=views), torch.randn(8, TEXT_DIM, generator=views)
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % 4
    latent = centres[classes] + 0.6 * torch.randn(n, 8, generator=g)
    z = latent @ to_image + 1.0 * torch.randn(n, IMAGE_DIM, generator=g)
    t = latent @ to_text + 1.0 * torch.randn(n, TEXT_DIM, generator=g)
    return z, t, F.one_hot(classes, 4).float()


def i2t_map(model: LSCH, zq: torch.Tensor, yq: torch.Tensor, td: torch.Tensor, yd: torch.Tensor, bits: int) -> float:
    """MAP@all of image queries against a report database, Hamming ranking, shared-label relevance."""
    with torch.no_grad():
        q = model.codes(model.embed_image(zq), bits).numpy()
        d = model.codes(model.embed_text(td), bits).numpy()
    return hamming_metrics(pack_codes(q), pack_codes(d), label_relevance(yq.numpy(), yd.numpy()))["map@all"]


def test_synthetic_training_beats_random_codes():
    z, t, labels = synthetic_pairs(200, seed=0)
    zq, _, yq = synthetic_pairs(40, seed=1)
    model = build(bits=(16,))
    rng = np.random.default_rng(0)
    random_map = hamming_metrics(
        pack_codes(rng.integers(0, 2, (40, 16))), pack_codes(rng.integers(0, 2, (200, 16))),
        label_relevance(yq.numpy(), labels.numpy()),
    )["map@all"]
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(80):
        idx = torch.randperm(200, generator=g)[:32]
        loss_fn = alignment_loss if step < 15 else lsch_loss
        loss, _ = loss_fn(model, z[idx], t[idx], labels[idx], model.params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    trained_map = i2t_map(model, zq, yq, t, labels, 16)
    assert random_map < 0.35 and trained_map > 0.7, (random_map, trained_map)


@pytest.mark.real
def test_real_gemma_forward_backward():
    from medhash.services.backbones.llm import load_causal_lm

    cfg = load_config(None, {"codes.bits": (32, 64), "llm.num_layers": 2})
    llm, tokenizer = load_causal_lm(cfg.llm)
    model = LSCH(cfg, 1280, 384, 0, llm, tokenizer)
    assert model.dim == 640 and 0.1 < model.prompted.token_scale < 10
    z, t = torch.randn(4, 1280), F.normalize(torch.randn(4, 384), dim=1)
    loss, parts = lsch_loss(model, z, t, F.one_hot(torch.arange(4) % 2, 2).float(), model.params)
    loss.backward()
    assert np.isfinite(parts["total"]) and model.prompted.soft_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.parameters())


@pytest.mark.real
def test_real_gemma_without_its_weights_hashes_as_the_full_model(tmp_path):
    """What the Hasher deployment loads: the run's trainable state on an LLM of shapes only."""
    from medhash.services.methods import load_trained
    from medhash.services.run_dir import RunDir

    cfg = load_config(None, {"codes.bits": (16, 64), "llm.num_layers": 2})
    model = LSCH.build(cfg, 1280, 384).eval()
    run = RunDir(tmp_path / "run")
    run.write(cfg, model.state_dict_trainable(), [], [], {"image_dim": 1280, "text_dim": 384})
    _, hashing_only = load_trained(run, frozen_weights=False)
    assert all(p.is_meta for p in hashing_only.prompted.llm.parameters())
    with torch.no_grad():
        v = model.embed_text(F.normalize(torch.randn(4, 384), dim=1))
        for bits in cfg.codes.bits:
            assert torch.equal(model.codes(v, bits), hashing_only.codes(v, bits))
