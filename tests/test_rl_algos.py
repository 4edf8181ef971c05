"""The algorithm registry, Sibling-GRPO's advantages and one update of every algorithm (agents.rl.registry,
agents.rl.sibling_grpo, agents.rl.loop)."""

import math

import pytest
import torch

from agents.hepo import Args
from agents.rl.buffer import Buffer
from agents.rl.common import LossConfig, group_zscore, level_weights
from agents.rl.loop import PathTerms, UpdateConfig, clip_gradients, parameter_groups, path_terms, update
from agents.rl.registry import ALGOS, algorithm
from agents.rl.sibling_grpo import sibling_zscore
from gpr_sim.model import GPRModel
from gpr_sim.sampling import sample_paths
from tests.test_model_gpr import random_trie
from tests.test_model_hsd import TINY, layout, make_tokens

EPS = 1e-4


def test_registry_lists_every_algorithm_and_rejects_an_unknown_name():
    assert list(ALGOS) == ["hepo", "ppo", "grpo", "sibling_grpo", "dpo"]
    assert all(algorithm(name).name == name for name in ALGOS)
    known = r"\['hepo', 'ppo', 'grpo', 'sibling_grpo', 'dpo'\]"
    with pytest.raises(ValueError, match=f"algo='a2c' is unknown: expected one of {known}"):
        algorithm("a2c")
    with pytest.raises(ValueError, match="algo='a2c' is unknown"):
        Args(algo="a2c")
    assert Args(algo="sibling_grpo").algo == "sibling_grpo"
    assert [n for n, a in ALGOS.items() if a.critic] == ["hepo", "ppo"]
    assert [n for n, a in ALGOS.items() if a.reference] == ["dpo"]


def test_sibling_advantages_match_a_hand_computed_case():
    codes = torch.tensor(
        [
            [[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]],  # request 0: a tree with branches at every level
            [[2, 1, 0], [2, 1, 0], [2, 1, 1], [2, 0, 0]],  # request 1: one path sampled twice, one first code
        ]
    )
    reward = torch.tensor([[1.0, 3.0, 2.0, 6.0], [4.0, 4.0, 1.0, 1.0]])
    adv = sibling_zscore(codes, reward, EPS)
    s = math.sqrt
    # request 0, level 1: the whole group {1, 3, 2, 6}: mean 3, var (4 + 0 + 1 + 9) / 4 = 3.5
    # level 2: paths 0-2 share z_1 = 0: {1, 3, 2}, mean 2, var (1 + 1 + 0) / 3 = 2/3; path 3 alone -> 0
    # level 3: paths 0, 1 share (0, 0): {1, 3}, mean 2, var 1; paths 2 and 3 alone -> 0
    want0 = [
        [(1 - 3) / (s(3.5) + EPS), (1 - 2) / (s(2 / 3) + EPS), -1 / (1 + EPS)],
        [(3 - 3) / (s(3.5) + EPS), (3 - 2) / (s(2 / 3) + EPS), 1 / (1 + EPS)],
        [(2 - 3) / (s(3.5) + EPS), (2 - 2) / (s(2 / 3) + EPS), 0.0],
        [(6 - 3) / (s(3.5) + EPS), 0.0, 0.0],
    ]
    # request 1, levels 1 and 2: every path starts (2, ...): {4, 4, 1, 1}, mean 2.5, var 2.25, std 1.5
    # level 3: paths 0-2 share (2, 1): {4, 4, 1}, mean 3, var (1 + 1 + 4) / 3 = 2; path 3 alone -> 0
    want1 = [
        [1.5 / (1.5 + EPS), 1.5 / (1.5 + EPS), 1 / (s(2) + EPS)],
        [1.5 / (1.5 + EPS), 1.5 / (1.5 + EPS), 1 / (s(2) + EPS)],
        [-1.5 / (1.5 + EPS), -1.5 / (1.5 + EPS), -2 / (s(2) + EPS)],
        [-1.5 / (1.5 + EPS), -1.5 / (1.5 + EPS), 0.0],
    ]
    torch.testing.assert_close(adv, torch.tensor([want0, want1]))


def test_sibling_advantage_of_the_first_level_is_grpo_and_a_lone_path_gets_zero():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (6, 8, 3), generator=gen)
    reward = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    adv = sibling_zscore(codes, reward, EPS)
    torch.testing.assert_close(adv[..., 0], group_zscore(reward, EPS))  # empty prefix: the whole group
    prefix = codes[..., None, :2] == codes[..., None, :, :2]  # (B, K, K, 2)
    alone = prefix.all(-1).sum(-1) == 1  # (B, K): no other path shares z_1 z_2
    assert bool(alone.any())  # the case is exercised
    assert bool((adv[..., 2][alone] == 0).all())


def _tiny_buffer(model: GPRModel, m: int = 6, k: int = 4) -> Buffer:
    """A rollout buffer of ``m`` random requests, ``k`` paths each sampled from ``model`` on a random trie."""
    gen = torch.Generator().manual_seed(0)
    tokens = make_tokens(layout(3, 3), m, gen)
    trie = random_trie(n=20)
    with torch.no_grad():
        ctx = model.context(tokens, gen)
        step_fn, _ = model.beam_fns(ctx)
        s = sample_paths(step_fn, trie, m, k, generator=gen)
        values = model.path_values(ctx, s.codes)  # (M, K, L + 1)
    length = s.codes.shape[-1]
    noise = torch.randn(m, TINY.d_model, generator=gen)
    return Buffer(
        tokens,
        noise,
        s.codes,
        s.log_prob,
        s.legal,
        values,
        torch.randn(m, k, generator=gen),
        torch.rand(m, k, length, generator=gen),
        s.valid,
        torch.zeros(m, dtype=torch.bool),
        uid=torch.arange(m),
    )


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_every_algorithm_runs_one_update_with_finite_named_terms(name, kl_coef):
    torch.manual_seed(0)
    model = GPRModel(TINY).eval()  # no dropout: the recomputed log-probs equal the rollout's
    algo, cfg = algorithm(name), LossConfig(kl_coef=kl_coef)
    buf = _tiny_buffer(model)
    # the rollout's log-probs are what the model gives with the buffer's noise
    with torch.no_grad():
        buf.old_log_prob, buf.old_values = path_terms(model, buf)
    buf.adv, buf.returns = algo.targets(buf, cfg)
    assert (buf.stats is not None) == (name == "hepo")  # only HEPO logs hepo/* statistics
    ref = GPRModel(TINY).eval().requires_grad_(False) if algo.reference or kl_coef > 0 else None
    if ref is not None:
        ref.load_state_dict(model.state_dict())
    # the critic flag says whether the loss has a critic term
    with torch.no_grad():
        lp, values = path_terms(model, buf)
        _, critic = algo.loss(lp, values, None if ref is None else lp, buf, cfg)
    assert (critic is not None) == algo.critic
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    terms = update(
        PathTerms(model), model, opt, ref, buf, algo, cfg, UpdateConfig(epochs=1, minibatch=len(buf)), 0
    )
    want = {
        "loss",
        "policy",
        "critic",
        "item_value",
        "approx_kl",
        "clip_frac",
        "grad_norm",
        "grad_norm_policy",
        "grad_norm_critic",
        "grad_clipped",
    } | ({"kl_ref"} if kl_coef else set())
    if algo.monitor is not None:  # the algorithm's own watched terms (DPO's log-ratios), logged beside
        want |= set(algo.monitor(lp, lp, buf, cfg))
    assert set(terms) == {f"train/{k}" for k in want}
    assert all(math.isfinite(v) for v in terms.values()), terms
    # one minibatch, before its step: the policy is the rollout's (ratio 1), at its reference
    assert terms["train/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert terms["train/clip_frac"] == 0.0
    if kl_coef:
        assert terms["train/kl_ref"] == pytest.approx(0.0, abs=1e-6)
    if (
        name == "dpo"
    ):  # at the reference every log-ratio is 0 (to rounding: the two forwards are separate calls)
        assert terms["train/dpo_chosen_logratio"] == pytest.approx(0.0, abs=1e-5)
        assert terms["train/dpo_rejected_logratio"] == pytest.approx(0.0, abs=1e-5)
        assert 0.0 <= terms["train/dpo_accuracy"] <= 1.0 and 0.0 < terms["train/dpo_pairs"] <= 1.0
    if not algo.critic:
        assert terms["train/critic"] == 0.0
    if name == "sibling_grpo":  # ratio 1: -sum_l c_l mean A_l
        want_policy = -(level_weights(buf.codes.shape[-1]) * buf.adv.mean((0, 1))).sum()
        assert terms["train/policy"] == pytest.approx(float(want_policy), abs=1e-5)
    moved = any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert moved


def test_update_config_rejects_bad_values():
    with pytest.raises(ValueError, match="epochs"):
        UpdateConfig(epochs=0)
    with pytest.raises(ValueError, match="minibatch"):
        UpdateConfig(minibatch=True)
    with pytest.raises(ValueError, match="max_grad_norm"):
        UpdateConfig(max_grad_norm=math.nan)
    with pytest.raises(ValueError, match="max_grad_norm"):
        UpdateConfig(max_grad_norm=0.0)
    with pytest.raises(ValueError, match="clip='both' is invalid"):
        UpdateConfig(clip="both")
    with pytest.raises(ValueError, match="grad_clip='both' is invalid"):
        Args(grad_clip="both")


def _model_with_gradients(seed: int) -> GPRModel:
    """The tiny generator with a gradient on every parameter, the HTE's far larger than the rest (as the GPU runs'
    critic loss is ~40x the policy's)."""
    torch.manual_seed(seed)
    model = GPRModel(TINY)
    critic = {id(p) for p in model.critic_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p) * (10.0 if id(p) in critic else 0.1)
    return model


def _norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


def test_joint_clip_is_clip_grad_norm_and_separate_clips_each_group_on_its_own_norm():
    model = _model_with_gradients(0)
    critic = model.critic_parameters()
    assert {id(p) for p in critic} == {id(p) for p in model.hte.parameters()} and critic
    policy = [p for p in model.parameters() if all(p is not q for q in critic)]
    every, policy_group, critic_group = parameter_groups(model)  # the model's order, split in two
    assert [id(p) for p in every] == [id(p) for p in model.parameters()]
    assert [id(p) for p in policy_group] == [id(p) for p in policy]
    assert {id(p) for p in critic_group} == {id(p) for p in critic}
    before = (_norm(model.parameters()), _norm(policy), _norm(critic))
    assert before[1] > 1.0 and before[2] > 10 * before[1]

    joint = _model_with_gradients(0)
    norms = clip_gradients(parameter_groups(joint), 1.0, "joint")
    reference = _model_with_gradients(0)
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert torch.equal(norms[0], total)  # the step the runs recorded, to the bit
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(joint.parameters(), reference.parameters()))
    assert [float(n) for n in norms] == pytest.approx(before, rel=1e-5)
    # one clip: the critic's gradient shrank the policy's step far below the limit
    assert _norm([p for p in joint.parameters() if p.grad is not None]) == pytest.approx(1.0, rel=1e-4)
    joint_policy = [p for p in joint.parameters() if all(p is not q for q in joint.critic_parameters())]
    assert _norm(joint_policy) < 0.2

    separate = _model_with_gradients(0)
    clip_gradients(parameter_groups(separate), 1.0, "separate")
    sep_critic = separate.critic_parameters()
    sep_policy = [p for p in separate.parameters() if all(p is not q for q in sep_critic)]
    assert _norm(sep_policy) == pytest.approx(1.0, rel=1e-4) and _norm(sep_critic) == pytest.approx(
        1.0, rel=1e-4
    )
    # each group kept its direction: one scale per group
    for p, q in zip(separate.parameters(), _model_with_gradients(0).parameters()):
        scale = 1.0 / (before[2] if any(p is c for c in sep_critic) else before[1])
        torch.testing.assert_close(p.grad, q.grad * scale, rtol=1e-4, atol=1e-7)

    # below the limit neither clip changes a gradient
    for clip in ("joint", "separate"):
        small = _model_with_gradients(0)
        clip_gradients(parameter_groups(small), 1e6, clip)
        assert all(
            torch.equal(p.grad, q.grad)
            for p, q in zip(small.parameters(), _model_with_gradients(0).parameters())
        )
