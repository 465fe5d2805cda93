"""The GBRBM against its energy (brute force over all hidden states) and CD pre-training on known data."""
from __future__ import annotations

import itertools

import pytest
import torch

from medhash.services.methods.gbrbm import GBRBM, pretrain_gbrbm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_rbm(n_visible=5, n_hidden=4, seed=0) -> GBRBM:
    torch.manual_seed(seed)
    rbm = GBRBM(n_visible, n_hidden)
    with torch.no_grad():
        rbm.W.normal_(0, 0.7)
        rbm.b.normal_()
        rbm.a.normal_()
        rbm.log_var.uniform_(-1.0, 1.0)
    return rbm


def energy(rbm: GBRBM, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """E(v, h) written term by term from docs/method.md, for one v and one h."""
    sigma = torch.exp(0.5 * rbm.log_var)
    quadratic = sum((v[i] - rbm.b[i]) ** 2 / (2 * sigma[i] ** 2) for i in range(len(v)))
    hidden = sum(rbm.a[j] * h[j] for j in range(len(h)))
    coupling = sum(v[i] / sigma[i] * rbm.W[i, j] * h[j] for i in range(len(v)) for j in range(len(h)))
    return quadratic - hidden - coupling


def all_hidden_states(n_hidden: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n_hidden)))


def test_free_energy_is_minus_log_sum_over_hidden_states():
    rbm = random_rbm()
    v = torch.randn(6, 5) * 2
    states = all_hidden_states(4)
    with torch.no_grad():
        log_z_v = [torch.logsumexp(torch.stack([-energy(rbm, x, h) for h in states]), 0) for x in v]
        expected = -torch.stack(log_z_v)
        torch.testing.assert_close(rbm.free_energy(v), expected, rtol=1e-5, atol=1e-5)


def test_hidden_probs_are_the_conditional_of_the_energy():
    rbm = random_rbm(seed=1)
    v = torch.randn(4, 5)
    states = all_hidden_states(4)
    with torch.no_grad():
        for x, probs in zip(v, rbm.hidden_probs(v)):
            weights = torch.softmax(torch.stack([-energy(rbm, x, h) for h in states]), 0)
            torch.testing.assert_close(probs, weights @ states, rtol=1e-5, atol=1e-6)
        codes = rbm.codes(v)
    assert codes.dtype == torch.bool and codes.shape == (4, 4)
    assert torch.equal(codes, rbm.hidden_probs(v) > 0.5)


def test_visible_conditional_matches_its_mean_and_std():
    rbm = random_rbm(seed=2)
    h = torch.tensor([[1.0, 0.0, 1.0, 1.0]]).expand(20000, 4)
    with torch.no_grad():
        samples = rbm.sample_visible(h)
        torch.testing.assert_close(rbm.visible_mean(h[:1])[0], rbm.b + rbm.sigma * (rbm.W @ h[0]))
        torch.testing.assert_close(samples.mean(0), rbm.visible_mean(h[:1])[0], atol=0.05, rtol=0)
        torch.testing.assert_close(samples.std(0), rbm.sigma, atol=0.03, rtol=0)
    assert set(rbm.sample_hidden(torch.randn(8, 5)).unique().tolist()) <= {0.0, 1.0}


def test_cd_loss_gradient_is_data_minus_model_free_energy_gradient():
    rbm = random_rbm(seed=3)
    v = torch.randn(16, 5)
    torch.manual_seed(7)
    rbm.cd_loss(v, k=2).backward()
    got = [p.grad.clone() for p in rbm.parameters()]
    rbm.zero_grad()
    torch.manual_seed(7)  # the same Gibbs chain, run by hand
    with torch.no_grad():
        v_k = v
        for _ in range(2):
            v_k = rbm.sample_visible(rbm.sample_hidden(v_k))
    (rbm.free_energy(v).mean() - rbm.free_energy(v_k).mean()).backward()
    for grad, param in zip(got, rbm.parameters()):
        torch.testing.assert_close(grad, param.grad)


def test_gradients_flow_through_hidden_probs():
    rbm = random_rbm(seed=4)
    v = torch.randn(3, 5, requires_grad=True)
    rbm.hidden_probs(v).pow(2).sum().backward()
    for name, param in [("W", rbm.W), ("a", rbm.a), ("log_var", rbm.log_var), ("v", v)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert rbm.b.grad is None  # the hidden conditional does not involve the visible bias


def test_pretraining_separates_a_two_component_mixture():
    torch.manual_seed(0)
    component = torch.randint(0, 2, (600,))
    centres = torch.tensor([[-1.5] * 8, [1.5] * 8])
    data = centres[component] + 0.5 * torch.randn(600, 8)
    rbm = GBRBM(8, 4)
    errors = pretrain_gbrbm(rbm, data, epochs=40, batch_size=50, lr=0.01)
    assert len(errors) == 40 and errors[-1] < 0.3 * errors[0]
    bit_rates = [rbm.codes(data[component == c]).float().mean(0) for c in (0, 1)]
    assert (bit_rates[0] - bit_rates[1]).abs().max() > 0.95  # some bit tells the components apart
    # sigma moves from 1 toward the spread around each centre (0.5)
    assert ((rbm.sigma - 0.5).abs() < 0.15).all()


def test_learned_sigma_follows_the_per_unit_data_std():
    torch.manual_seed(1)
    std = torch.tensor([0.3] * 3 + [2.0] * 3)
    data = 1.0 + std * torch.randn(1500, 6)
    rbm = GBRBM(6, 3)
    pretrain_gbrbm(rbm, data, epochs=15, batch_size=50, lr=0.02)
    torch.testing.assert_close(rbm.sigma.detach(), std, rtol=0.2, atol=0)


def test_pretraining_refuses_wrong_data():
    rbm = GBRBM(4, 2)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        pretrain_gbrbm(rbm, torch.zeros(10, 3), epochs=1, batch_size=4, lr=0.01)
    with pytest.raises(ValueError, match="NaN"):
        pretrain_gbrbm(rbm, torch.full((10, 4), float("nan")), epochs=1, batch_size=4, lr=0.01)
