"""The ``topk`` router against hand-computed cases and plain formulas (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mcore.errors import ConfigError
from mcore.protocols import Router
from mcore_moe.router import RouterConfig, TopKRouter
from mcore_testing.dist import run_distributed
from mcore_testing.numerics import assert_rel_close, seeded_randn


def _identity_router(num_experts: int, **kw: object) -> TopKRouter:
    """A router whose logits are the hidden states themselves (weight = I)."""
    router = TopKRouter(RouterConfig(num_experts=num_experts, **kw), hidden_size=num_experts)  # type: ignore[arg-type]
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def test_is_a_router() -> None:
    assert isinstance(TopKRouter(hidden_size=4), Router)


def test_softmax_before_topk_normalised_and_not() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    routing = _identity_router(4, top_k=2).route(z)
    assert routing.experts.tolist() == [[2, 1]]
    e2, e3 = math.exp(2), math.exp(3)
    assert_rel_close(routing.weights, torch.tensor([[e3 / (e3 + e2), e2 / (e3 + e2)]]), 1e-6)
    raw = _identity_router(4, top_k=2, normalize=False).route(z)
    total = sum(math.exp(v) for v in (1, 2, 3, 0))
    assert_rel_close(raw.weights, torch.tensor([[e3 / total, e2 / total]]), 1e-6)


def test_softmax_after_topk() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    routing = _identity_router(4, top_k=2, softmax_after_topk=True, normalize=False).route(z)
    assert routing.experts.tolist() == [[2, 1]]
    assert_rel_close(routing.weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1), 1e-6)


def test_sigmoid_chooses_by_score_plus_bias_and_weighs_by_score() -> None:
    router = _identity_router(4, top_k=2, score_function="sigmoid", expert_bias=True, routed_scaling_factor=2.5)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, -3.0, 5.0]))
    routing = router.route(torch.tensor([[0.0, 1.0, 2.0, -1.0]]))
    assert routing.experts.tolist() == [[3, 1]]  # expert 2 has the best score but the bias pushes it out
    s3, s1 = 1 / (1 + math.exp(1)), 1 / (1 + math.exp(-1))
    assert_rel_close(routing.weights, torch.tensor([[s3, s1]]) / (s3 + s1) * 2.5, 1e-6)


def test_sqrtsoftplus_scores_in_fp32() -> None:
    router = _identity_router(3, top_k=1, score_function="sqrtsoftplus", normalize=False)
    routing = router.route(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.bfloat16))
    assert routing.experts.tolist() == [[2]] and routing.weights.dtype == torch.float32
    assert_rel_close(routing.weights, torch.tensor([[math.sqrt(math.log1p(math.exp(2.0)))]]), 1e-6)


def test_group_limited_topk_scores_groups_by_their_top_two() -> None:
    s = torch.tensor([[0.9, 0.1, 0.6, 0.6, 0.55, 0.55, 0.2, 0.2]])  # group sums of two: 1.0, 1.2, 1.1, 0.4
    z = torch.log(s / (1 - s))  # sigmoid(z) = s
    grouped = _identity_router(8, top_k=2, score_function="sigmoid", num_groups=4, topk_groups=2).route(z)
    assert sorted(grouped.experts.tolist()[0]) == [2, 3]  # groups 1 and 2 only: expert 0 (0.9) is not eligible
    plain = _identity_router(8, top_k=2, score_function="sigmoid").route(z)
    assert plain.experts.tolist()[0][0] == 0


def test_group_scores_use_the_bias() -> None:
    s = torch.tensor([[0.9, 0.1, 0.6, 0.6, 0.55, 0.55, 0.2, 0.2]])
    z = torch.log(s / (1 - s))
    router = _identity_router(8, top_k=2, score_function="sigmoid", num_groups=4, topk_groups=1, expert_bias=True)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]))  # group 3: 2.4
    assert sorted(router.route(z).experts.tolist()[0]) == [6, 7]


def _plain_aux(weight: torch.Tensor, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Switch balance loss and the z-loss written out token by token and expert by expert."""
    logits = x @ weight.T
    n, e = logits.shape
    probs = torch.softmax(logits, -1)
    chosen = probs.detach().topk(top_k, -1).indices
    aux = torch.zeros(())
    for j in range(e):
        f = float((chosen == j).sum()) / (n * top_k)
        aux = aux + f * probs[:, j].mean()
    z = sum(torch.logsumexp(logits[i], 0) ** 2 for i in range(n)) / n
    return e * aux, z  # type: ignore[return-value]


def test_aux_and_z_loss_and_their_gradients_match_the_plain_formula() -> None:
    router = TopKRouter(RouterConfig(num_experts=4, top_k=2, aux_loss_coeff=0.01, z_loss_coeff=0.001), hidden_size=6)
    x = seeded_randn(12, 6, seed=1)
    router.route(x)
    losses = dict(router.aux_losses())
    weight = router.weight.detach().clone().requires_grad_()
    aux, z = _plain_aux(weight, x, 2)
    assert_rel_close(losses["aux"], 0.01 * aux, 1e-5)
    assert_rel_close(losses["z"], 0.001 * z, 1e-5)
    (losses["aux"] + losses["z"]).backward()
    (0.01 * aux + 0.001 * z).backward()
    assert router.weight.grad is not None and weight.grad is not None
    assert_rel_close(router.weight.grad, weight.grad, 1e-5)


def test_uniform_router_losses_by_hand() -> None:
    router = TopKRouter(RouterConfig(num_experts=4, top_k=1, aux_loss_coeff=1.0, z_loss_coeff=1.0), hidden_size=3)
    with torch.no_grad():
        router.weight.zero_()
    router.route(seeded_randn(5, 3, seed=2))
    losses = dict(router.aux_losses())
    assert_rel_close(losses["aux"], torch.tensor(1.0), 1e-6)  # E * sum_e f_e / E
    assert_rel_close(losses["z"], torch.tensor(math.log(4) ** 2), 1e-6)


def test_sequence_aux_loss_is_the_mean_over_sequences() -> None:
    config = RouterConfig(num_experts=4, top_k=2, score_function="sigmoid", seq_aux_loss_coeff=0.1)
    router = TopKRouter(config, hidden_size=5)
    x = seeded_randn(8, 5, seed=3)
    router.route(x, num_sequences=2)
    seq = dict(router.aux_losses())["seq_aux"]
    per_seq = []
    for part in x.split(4):
        s = torch.sigmoid(part @ router.weight.detach().T)
        probs = s / s.sum(-1, keepdim=True)
        chosen = s.topk(2, -1).indices
        f = torch.stack([(chosen == j).sum() for j in range(4)]).float() / 8
        per_seq.append(4 * (f * probs.mean(0)).sum())
    assert_rel_close(seq, 0.1 * torch.stack(per_seq).mean(), 1e-5)


def test_capacity_drops_by_probability_or_position() -> None:
    z = torch.tensor([[-2.2, -9.0], [2.2, -9.0], [0.0, -9.0], [-0.85, -9.0]])  # every token picks expert 0
    for policy, kept in (("probs", [1, 2]), ("position", [0, 1])):
        router = _identity_router(2, top_k=1, score_function="sigmoid", capacity_factor=1.0, drop_policy=policy)
        routing = router.route(z)  # capacity ceil(1.0 * 4 / 2) = 2
        expected = [[0] if i in kept else [-1] for i in range(4)]
        assert routing.experts.tolist() == expected, policy
        assert (routing.weights[[i for i in range(4) if i not in kept]] == 0).all()


def test_bias_moves_toward_the_mean_load() -> None:
    router = TopKRouter(RouterConfig(num_experts=4, expert_bias=True, bias_update_rate=0.1), hidden_size=2)
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    assert router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    assert "expert_bias" in router.state_dict() and "step_load" not in router.state_dict()
    assert all(p is not router.expert_bias for p in router.parameters())


def test_load_is_counted_in_training_once_per_micro_batch() -> None:
    router = TopKRouter(RouterConfig(num_experts=4, top_k=2, expert_bias=True), hidden_size=3)
    x = seeded_randn(6, 3, seed=4).requires_grad_()
    router.eval()
    router.route(x)
    assert router.step_load.sum() == 0  # evaluation does not count
    router.train()
    out = torch.utils.checkpoint.checkpoint(lambda h: router.route(h).weights, x, use_reentrant=False)
    out.sum().backward()  # the recompute in backward must not count again
    assert router.step_load.sum() == 12


def _bias_update_over_dp() -> None:
    import torch.distributed as dist

    rank = dist.get_rank()
    router = TopKRouter(RouterConfig(num_experts=2, top_k=1, expert_bias=True, bias_update_rate=0.5), hidden_size=2)
    router.step_load.copy_(torch.tensor([4.0, 0.0]) if rank == 0 else torch.tensor([0.0, 6.0]))

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    router.after_optimizer_step(reduce, applied=False)  # a skipped step: counts forgotten, bias unchanged
    assert router.expert_bias.tolist() == [0.0, 0.0] and router.step_load.sum() == 0
    router.step_load.copy_(torch.tensor([4.0, 0.0]) if rank == 0 else torch.tensor([0.0, 6.0]))
    router.after_optimizer_step(reduce, applied=True)  # summed load [4, 6]: expert 1 is over the mean
    assert router.expert_bias.tolist() == [0.5, -0.5], router.expert_bias


def test_bias_update_sums_the_load_over_data_parallel_ranks() -> None:
    run_distributed(_bias_update_over_dp, 2, timeout=60)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"num_experts": 4, "top_k": 5}, "model.moe.top_k = 5: must be at most num_experts = 4"),
        ({"num_experts": 6, "num_groups": 4}, "model.moe.num_groups = 4: must divide num_experts = 6"),
        ({"capacity_factor": 0.0}, "model.moe.capacity_factor = 0.0: must be a finite number > 0"),
        ({"capacity_factor": -1}, "model.moe.capacity_factor = -1"),
        ({"score_function": "tanh"}, "model.moe.score_function = 'tanh': allowed: softmax, sigmoid, sqrtsoftplus"),
        ({"num_experts": 8, "num_groups": 4, "topk_groups": 5}, "model.moe.topk_groups = 5"),
    ],
)
def test_wrong_settings_are_one_line_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RouterConfig(**kw)  # type: ignore[arg-type]
    assert message in str(info.value) and "\n" not in str(info.value)


def test_softplus_helper_matches_torch() -> None:
    z = seeded_randn(4, 3, seed=5)
    router = TopKRouter(
        RouterConfig(num_experts=3, top_k=3, score_function="sqrtsoftplus", normalize=False), hidden_size=3
    )
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
    routing = router.route(z)
    assert_rel_close(routing.weights, torch.sqrt(F.softplus(z)).gather(1, routing.experts), 1e-6)


def test_bias_stays_fp32_when_the_model_is_cast() -> None:
    router = TopKRouter(RouterConfig(num_experts=2, expert_bias=True), hidden_size=2)
    router.expert_bias.fill_(1e-3 / 3)
    value = router.expert_bias.clone()
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, value)
    assert router.step_load.dtype == torch.float32
