"""KVPO pieces against hand computations (itertools, statistics, numpy, math), torch.distributions and autograd of
independently written energies and losses."""

import itertools
import math
import statistics

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from diffusers_raven.training import (
    anchor_advantages,
    branch_plans,
    fuse_advantages,
    gibbs_log_policy,
    kvpo_loss,
    recorded_velocity,
    safety_gate,
    trajectory_velocity_energy,
)

SIGMAS = [1.0, 0.9375, 0.8333, 0.625]  # METHOD §1


# ---------------------------------------------------------------------------------------------- branch plans
def _hand_plans(pool, branches, n, generator):
    ordered = sorted(pool)
    order = [ordered[i] for i in torch.randperm(len(pool), generator=generator).tolist()]
    stride = max(1, len(pool) // branches)
    return [sorted(itertools.islice(itertools.cycle(order), g * stride, g * stride + n)) for g in range(branches)]


POOL = [30, 4, 17, 9, 22, 11, 5, 40, 2, 13]


@pytest.mark.parametrize(
    "pool, branches, n",
    [(POOL, 4, 2), (POOL, 3, 3), (POOL, 3, 5), (POOL, 8, 4), (POOL, 1, 10), ([7, 1, 3], 5, 2), ([6], 2, 1)],
)
@pytest.mark.parametrize("seed", [0, 7])
def test_branch_plans_by_hand(pool, branches, n, seed):
    got = branch_plans(pool, branches, n, seed)
    expected = _hand_plans(pool, branches, n, torch.Generator().manual_seed(seed))
    assert got.dtype == torch.int64 and got.shape == (branches, n)
    assert got.tolist() == expected
    # a generator gives the same plan as its seed, and its state advances: the next call uses the next permutation
    generator, hand = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert branch_plans(torch.tensor(pool), branches, n, generator).tolist() == _hand_plans(pool, branches, n, hand)
    assert branch_plans(pool, branches, n, generator).tolist() == _hand_plans(pool, branches, n, hand)


def test_branch_plans_wrap_around_by_hand():
    # pool 10, G = 3: stride 3, branch 2 starts at offset 6 and takes permuted positions 6, 7, 8, 9, 0
    order = [sorted(POOL)[i] for i in torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()]
    got = branch_plans(POOL, 3, 5, 3)
    assert got[2].tolist() == sorted(order[6:] + order[:1])
    assert got[0].tolist() == sorted(order[:5]) and got[1].tolist() == sorted(order[3:8])


@pytest.mark.parametrize("seed", range(5))
def test_branch_plans_overlap(seed):
    pool = list(range(5, 38))  # 33 eligible frames (the reference code's pool)
    for branches, n in [(8, 4), (4, 8), (3, 11), (8, 6), (5, 20)]:
        plans = branch_plans(pool, branches, n, seed).tolist()
        stride = len(pool) // branches
        for row in plans:
            assert row == sorted(set(row)) and set(row) <= set(pool) and len(row) == n
        for a, b in itertools.combinations(range(branches), 2):
            shared = len(set(plans[a]) & set(plans[b]))
            if branches * n <= len(pool):
                assert shared == 0
            if b == a + 1:
                assert shared <= max(0, n - stride)
    # more branches than frames: branch g and g + pool read the same slice
    plans = branch_plans([0, 1, 2], 7, 2, seed).tolist()
    assert plans[0] == plans[3] == plans[6] and plans[1] == plans[4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=11), "num_frames"),
        (dict(num_frames=0), "num_frames"),
        (dict(num_branches=0), "num_branches"),
        (dict(num_branches=2.0), "num_branches"),
        (dict(pool=[1, 2, 2]), "pool"),
        (dict(pool=[-1, 2]), "pool"),
        (dict(pool=[]), "pool"),
        (dict(pool=[1.0, 2.0]), "pool"),
        (dict(generator=None), "generator"),
        (dict(generator=True), "generator"),
    ],
)
def test_branch_plans_bad_input(kwargs, match):
    arguments = dict(pool=POOL, num_branches=3, num_frames=2, generator=0) | kwargs
    with pytest.raises(ValueError, match=match):
        branch_plans(**arguments)


# ---------------------------------------------------------------------------------------------- advantages
def test_anchor_advantages_by_hand():
    branches = [[0.9, 3.0, 0.2], [0.4, 5.0, 0.2], [0.7, 1.0, 0.2], [1.3, 2.0, 0.2]]  # component 2 constant
    anchor = [0.5, 4.0, 0.2]
    weights = [2.0, -0.5, 1.0]
    expected = []
    for row in branches:
        total = 0.0
        for c, w in enumerate(weights):
            spread = statistics.stdev([r[c] for r in branches] + [anchor[c]])
            total += w * (0.0 if spread == 0 else (row[c] - anchor[c]) / (spread + 1e-8))
        expected.append(total / sum(abs(w) for w in weights))
    got = anchor_advantages(torch.tensor(branches), torch.tensor(anchor), weights)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # one component, given as [G] with a 0-d anchor: the plain anchor-relative z-score
    column = [r[0] for r in branches]
    single = anchor_advantages(torch.tensor(column, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    spread = statistics.stdev(column + [0.5])
    np.testing.assert_allclose(single.numpy(), [(r - 0.5) / (spread + 1e-8) for r in column], rtol=1e-12)


def test_anchor_advantages_degenerate():
    same = anchor_advantages(torch.full((4, 2), 0.3), torch.tensor([0.3, 0.3]))
    assert same.tolist() == [0.0] * 4
    # a single branch against the anchor: two scores, std = |r − r_anchor| / √2
    one = anchor_advantages(torch.tensor([[1.0]]), torch.tensor([0.0]), eps=0.0)
    assert one.item() == pytest.approx(math.sqrt(2))
    # branches equal to each other but not to the anchor still differ from it
    assert bool((anchor_advantages(torch.ones(3), torch.tensor(0.0)) > 0).all())


def _hand_fuse(local, global_, mode, w_loc=1.0, w_glob=0.5, clip=2.5):
    def term(values):
        if mode == "none":
            return values
        if len(set(values)) < 2:
            return [0.0] * len(values)
        spread = statistics.stdev(values) + 1e-8
        centre = statistics.fmean(values) if mode == "zscore" else 0.0
        return [(v - centre) / spread for v in values]

    fused = [w_loc * a + w_glob * b for a, b in zip(term(local), term(global_))]
    return fused if clip is None else [min(max(v, -clip), clip) for v in fused]


LOCAL = [0.8, -0.3, 1.9, -1.2, 0.1]
GLOBAL = [-0.4, 0.6, 0.2, -0.9, 0.0]


@pytest.mark.parametrize("mode", ["std", "zscore", "none"])
@pytest.mark.parametrize("weights, clip", [((1.0, 0.5), 2.5), ((0.3, 2.0), None), ((1.0, 0.0), 1.0)])
def test_fuse_advantages_by_hand(mode, weights, clip):
    got = fuse_advantages(torch.tensor(LOCAL), torch.tensor(GLOBAL), mode, *weights, clip=clip)
    expected = _hand_fuse(LOCAL, GLOBAL, mode, *weights, clip=clip)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-12)


def test_fuse_advantages_clip_and_degenerate():
    local = torch.tensor([10.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # 10 / stdev([10, 0, 0, 0, 0, 0]) = √6 ≈ 2.449: below the clip alone, 1.5 · √6 ≈ 3.67 with both terms
    assert fuse_advantages(local, torch.zeros(6), "std")[0].item() == pytest.approx(math.sqrt(6))
    got = fuse_advantages(local, local, "std")
    assert got[0].item() == 2.5 and got[1:].tolist() == [0.0] * 5
    # a constant term (all branches equally good) carries no contrast: std and zscore drop it, none keeps it
    constant = torch.full((4,), 0.7)
    varied = torch.tensor([0.1, -0.2, 0.4, 0.0])
    assert torch.equal(fuse_advantages(constant, constant, "std"), torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(fuse_advantages(varied, constant, "zscore"), fuse_advantages(varied, 0 * varied, "zscore"))
    assert fuse_advantages(constant, constant, "none").tolist() == pytest.approx([1.05] * 4)
    assert fuse_advantages(torch.tensor([3.0]), torch.tensor([1.0]), "std").tolist() == [0.0]  # G = 1
    assert not bool(torch.isnan(fuse_advantages(torch.zeros(3), torch.zeros(3), "zscore")).any())


def test_fuse_advantages_clip_value():
    # the unclipped value by hand: 10 / stdev([10, 0, 0, 0, 0, 0]) = √6 ≈ 2.449 < 2.5
    local = torch.tensor([10.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    got = fuse_advantages(local, torch.zeros(6), "std", clip=None)
    assert got[0].item() == pytest.approx(10 / (statistics.stdev([10.0, 0, 0, 0, 0, 0]) + 1e-8))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: anchor_advantages(torch.ones(3, 2), torch.ones(3)), "anchor_rewards"),
        (lambda: anchor_advantages(torch.tensor([1.0, math.nan]), torch.tensor(0.0)), "rewards"),
        (lambda: anchor_advantages(torch.ones(3, 2), torch.ones(2), [1.0]), "weights"),
        (lambda: anchor_advantages(torch.ones(3, 0), torch.ones(0)), "rewards"),
        (lambda: anchor_advantages(torch.ones(3, 2), torch.ones(2), [0.0, 0.0]), "weights"),
        (lambda: anchor_advantages(torch.ones(3), torch.tensor(0.0), eps=-1.0), "eps"),
        (lambda: anchor_advantages(torch.ones(3, dtype=torch.int64), torch.tensor(0.0)), "rewards"),
        (lambda: fuse_advantages(torch.ones(3), torch.ones(4)), "global_"),
        (lambda: fuse_advantages(torch.ones(3), torch.ones(3), "mean"), "mode"),
        (lambda: fuse_advantages(torch.ones(3), torch.ones(3), local_weight=-1.0), "local_weight"),
        (lambda: fuse_advantages(torch.ones(3), torch.ones(3), local_weight=0.0, global_weight=0.0), "both"),
        (lambda: fuse_advantages(torch.ones(3), torch.ones(3), clip=0.0), "clip"),
        (lambda: fuse_advantages(torch.ones(2, 2), torch.ones(2, 2)), "local"),
    ],
)
def test_advantages_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- energy
def _velocities(branches=3, chunks=2, steps=4, shape=(2, 3, 2, 2)):
    generator = torch.Generator().manual_seed(11)
    pred = torch.randn(branches, chunks, steps, *shape, generator=generator, dtype=torch.float64)
    recorded = torch.randn(branches, chunks, steps, *shape, generator=generator, dtype=torch.float64)
    return pred, recorded


def test_recorded_velocity_by_hand():
    generator = torch.Generator().manual_seed(2)
    noisy = torch.randn(2, 3, 4, 5, generator=generator)
    x0 = torch.randn(2, 3, 4, 5, generator=generator)
    got = recorded_velocity(noisy, x0, torch.tensor(SIGMAS))
    expected = np.empty((2, 3, 4, 5))
    for g, b, k in itertools.product(range(2), range(3), range(4)):
        expected[g, b, k] = (noisy[g, b, k].numpy() - x0[g, b, k].numpy()) / SIGMAS[k]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("grad_steps", [1, 2, 4, None])
def test_energy_velocity_space_by_hand(grad_steps):
    pred, recorded = _velocities()
    got = trajectory_velocity_energy(pred, recorded, SIGMAS, grad_steps=grad_steps)
    p, r = pred.numpy(), recorded.numpy()
    expected = [
        0.5 * sum(np.mean((p[g, b, k] - r[g, b, k]) ** 2) for b in range(2) for k in range(4)) for g in range(3)
    ]
    assert got.dtype == torch.float64 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("floor", [1.0, 0.7, 0.5])
def test_energy_x0_space_by_hand(floor):
    """Replay the x̂0 predictions at a common state and compare them in x0 space with the σ floor."""
    pred, recorded = _velocities()
    noisy = torch.randn(pred.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).numpy()
    expected = []
    for g in range(3):
        total = 0.0
        for b, k in itertools.product(range(2), range(4)):
            x0_model = noisy[g, b, k] - SIGMAS[k] * pred[g, b, k].numpy()  # x̂0 = x − σ v
            x0_recorded = noisy[g, b, k] - SIGMAS[k] * recorded[g, b, k].numpy()
            total += np.mean((x0_model - x0_recorded) ** 2) / max(SIGMAS[k], floor) ** 2
        expected.append(0.5 * total)
    got = trajectory_velocity_energy(pred, recorded, SIGMAS, space="x0", sigma_floor=floor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    # a floor at or below the smallest sigma is the velocity-space energy
    np.testing.assert_allclose(
        trajectory_velocity_energy(pred, recorded, SIGMAS, space="x0", sigma_floor=0.6).numpy(),
        trajectory_velocity_energy(pred, recorded, SIGMAS).numpy(),
        rtol=1e-12,
    )


@pytest.mark.parametrize("grad_steps", [1, 2, 3, None])
@pytest.mark.parametrize("space", ["velocity", "x0"])
def test_energy_gradient_by_autograd(grad_steps, space):
    pred, recorded = _velocities()
    pred = pred.float().requires_grad_(True)
    energy = trajectory_velocity_energy(pred, recorded, SIGMAS, grad_steps=grad_steps, space=space)
    weights = [1.0] * 4 if space == "velocity" else [s * s for s in SIGMAS]  # floor 1: w_k = σ_k²
    (torch.arange(1.0, 4.0, dtype=torch.float64) * energy).sum().backward()

    # the same energy written out term by term; steps from grad_steps on enter as constants
    leaf = pred.detach().double().requires_grad_(True)
    hand = 0.0
    for g, b, k in itertools.product(range(3), range(2), range(4)):
        v = leaf[g, b, k] if grad_steps is None or k < grad_steps else leaf[g, b, k].detach()
        hand = hand + (g + 1) * 0.5 * weights[k] * ((v - recorded[g, b, k]) ** 2).mean()
    (expected,) = torch.autograd.grad(hand, leaf)
    np.testing.assert_allclose(pred.grad.double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-9)
    # closed form: (g + 1) w_k (v_θ − v) / numel on the first grad_steps steps, 0 after
    steps = 4 if grad_steps is None else grad_steps
    assert torch.all(pred.grad[:, :, steps:] == 0)
    numel = pred[0, 0, 0].numel()
    closed = (pred.detach().double() - recorded)[:, :, :steps] / numel
    closed = closed * torch.tensor(weights[:steps], dtype=torch.float64).view(1, 1, -1, 1, 1, 1, 1)
    closed = closed * torch.arange(1.0, 4.0, dtype=torch.float64).view(-1, 1, 1, 1, 1, 1, 1)
    np.testing.assert_allclose(pred.grad[:, :, :steps].double().numpy(), closed.numpy(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigmas=[1.0, 0.9, 0.8]), "sigmas"),
        (dict(sigmas=[1.0, 0.9, 0.8, 0.0]), "sigmas"),
        (dict(sigmas=[1.5, 0.9, 0.8, 0.5]), "sigmas"),
        (dict(grad_steps=0), "grad_steps"),
        (dict(grad_steps=1.5), "grad_steps"),
        (dict(space="noise"), "space"),
        (dict(sigma_floor=0.0), "sigma_floor"),
        (dict(sigma_floor=2.0), "sigma_floor"),
        (dict(recorded=torch.zeros(3, 2, 4, 1)), "recorded"),
        (dict(pred_velocity=torch.zeros(3, 2, 4), recorded=torch.zeros(3, 2, 4)), "pred_velocity"),
        (dict(pred_velocity=torch.full((3, 2, 4, 1), math.nan), recorded=torch.zeros(3, 2, 4, 1)), "pred_velocity"),
    ],
)
def test_energy_bad_input(kwargs, match):
    pred, recorded = _velocities()
    arguments = dict(pred_velocity=pred, recorded=recorded, sigmas=SIGMAS) | kwargs
    with pytest.raises(ValueError, match=match):
        trajectory_velocity_energy(**arguments)


def test_recorded_velocity_bad_input():
    x = torch.zeros(2, 1, 4, 3)
    with pytest.raises(ValueError, match="pred_original"):
        recorded_velocity(x, torch.zeros(2, 1, 4, 2), SIGMAS)
    with pytest.raises(ValueError, match="sigmas"):
        recorded_velocity(x, x, [1.0, 0.5])
    with pytest.raises(ValueError, match="noisy"):
        recorded_velocity(torch.zeros(2, 4), torch.zeros(2, 4), SIGMAS)


# ---------------------------------------------------------------------------------------------- Gibbs policy
ENERGY = [0.31, 0.12, 0.75, 0.2, 0.4]
OLD_ENERGY = [0.5, 0.5, 0.1, 0.25, 0.4]
REF_ENERGY = [0.2, 0.2, 0.3, 0.35, 0.1]
ADVANTAGES = [1.2, -0.7, 0.4, -2.1, 0.9]  # ratios ≈ [1.204, 1.456, 0.520, 1.047, 0.996]: only branch 0 is clipped


def _hand_loss(energy, old_energy, ref_energy, advantages, beta, low=0.1, high=0.2):
    def policy(e):
        z = sum(math.exp(-x) for x in e)
        return [math.exp(-x) / z for x in e]

    pi, old, ref = policy(energy), policy(old_energy), policy(ref_energy)
    ratio = [p / o for p, o in zip(pi, old)]
    terms = [min(r * a, min(max(r, 1 - low), 1 + high) * a) for r, a in zip(ratio, advantages)]
    kl = sum(p * math.log(p / q) for p, q in zip(pi, ref))
    clipped = [(r < 1 - low and a < 0) or (r > 1 + high and a > 0) for r, a in zip(ratio, advantages)]
    return -statistics.fmean(terms) + beta * kl, ratio, kl, statistics.fmean(clipped)


def _distribution_loss(energy, old_energy, ref_energy, advantages, beta, low=0.1, high=0.2):
    """The loss through torch.distributions.Categorical, for autograd."""
    policy, index = Categorical(logits=-energy), torch.arange(energy.numel())
    ratio = torch.exp(policy.log_prob(index) - Categorical(logits=-old_energy).log_prob(index))
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - low, 1 + high) * advantages)
    return -surrogate.mean() + beta * kl_divergence(policy, Categorical(logits=-ref_energy))


@pytest.mark.parametrize("beta", [0.0, 10.0])
def test_kvpo_loss_by_hand(beta):
    energy = torch.tensor(ENERGY, dtype=torch.float64)
    old = gibbs_log_policy(torch.tensor(OLD_ENERGY, dtype=torch.float64))
    ref = gibbs_log_policy(torch.tensor(REF_ENERGY, dtype=torch.float64))
    loss, stats = kvpo_loss(energy, torch.tensor(ADVANTAGES), old, ref, beta=beta)
    expected, ratio, kl, clip_fraction = _hand_loss(ENERGY, OLD_ENERGY, REF_ENERGY, ADVANTAGES, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["kvpo/ratio"].item() == pytest.approx(statistics.fmean(ratio), rel=1e-12)
    assert stats["kvpo/kl"].item() == pytest.approx(kl, rel=1e-10)
    assert stats["kvpo/clip_fraction"].item() == clip_fraction == 0.2
    assert stats["kvpo/policy_entropy"].item() == pytest.approx(Categorical(logits=-energy).entropy().item())
    assert stats["kvpo/policy_loss"].item() == pytest.approx(expected - beta * kl, rel=1e-6)
    np.testing.assert_allclose(gibbs_log_policy(energy).numpy(), Categorical(logits=-energy).logits.numpy())


@pytest.mark.parametrize("beta", [0.0, 10.0])
def test_kvpo_loss_gradient_by_autograd(beta):
    energy = torch.tensor(ENERGY, dtype=torch.float64, requires_grad=True)
    old_energy, ref_energy = torch.tensor(OLD_ENERGY), torch.tensor(REF_ENERGY)
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)
    loss, _ = kvpo_loss(energy, advantages, gibbs_log_policy(old_energy), gibbs_log_policy(ref_energy), beta=beta)
    (got,) = torch.autograd.grad(loss, energy)
    leaf = energy.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        _distribution_loss(leaf, old_energy.double(), ref_energy.double(), advantages, beta), leaf
    )
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-10, atol=1e-14)


def test_kvpo_gradient_lowers_good_energies():
    advantages = torch.tensor(ADVANTAGES, dtype=torch.float64)
    centred = advantages - advantages.mean()
    energy = torch.tensor(ENERGY, dtype=torch.float64, requires_grad=True)
    loss, stats = kvpo_loss(energy, centred, beta=0.0)  # on-policy
    (gradient,) = torch.autograd.grad(loss, energy)
    assert stats["kvpo/ratio"].item() == 1.0 and stats["kvpo/clip_fraction"].item() == 0.0
    # descent moves E_g by −gradient: down for Â > 0, up for Â < 0
    assert torch.equal(torch.sign(gradient), torch.sign(centred))
    # by hand on-policy: ∂L/∂E_g = (Â_g − π_g Σ_h Â_h) / G; with equal energies (uniform π) the sign is Â_g − mean Â
    flat = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(kvpo_loss(flat, advantages, beta=0.0)[0], flat)
    expected = [(a - statistics.fmean(ADVANTAGES)) / 5 for a in ADVANTAGES]
    np.testing.assert_allclose(gradient.numpy(), expected, rtol=1e-12)
    # one descent step raises the probability of the best branch and lowers that of the worst
    before = torch.softmax(-flat.detach(), 0)
    after = torch.softmax(-(flat.detach() - 0.1 * gradient), 0)
    assert after[0] > before[0] and after[3] < before[3]


def test_kvpo_loss_ratio_clamp_and_on_policy():
    energy = torch.zeros(2, dtype=torch.float64)
    old = torch.tensor([0.0, -1000.0], dtype=torch.float64)  # log-probabilities: logsumexp 0
    _, stats = kvpo_loss(energy, torch.tensor([-1.0, -1.0]), old, beta=0.0)
    # log ratios: log ½ − 0 and log ½ + 1000 → clamped to 20
    assert stats["kvpo/ratio"].item() == pytest.approx((0.5 + math.exp(20)) / 2)
    energy = torch.tensor(ENERGY, dtype=torch.float64)
    current = Categorical(logits=-energy).logits
    a = kvpo_loss(energy, torch.tensor(ADVANTAGES), beta=0.0)
    b = kvpo_loss(energy, torch.tensor(ADVANTAGES), current, beta=0.0)
    assert a[0].item() == pytest.approx(b[0].item())
    assert a[0].item() == pytest.approx(-statistics.fmean(ADVANTAGES))  # ρ = 1: −mean Â
    # π_ref = π_θ: no KL
    assert kvpo_loss(energy, torch.tensor(ADVANTAGES), ref_log_policy=current)[1]["kvpo/kl"].item() == pytest.approx(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ref_log_policy=None), "ref_log_policy"),
        (dict(old_log_policy=torch.zeros(5)), "old_log_policy"),
        (dict(old_log_policy=torch.log(torch.ones(4) / 4)), "old_log_policy"),
        (dict(advantages=torch.zeros(4)), "advantages"),
        (dict(energy=torch.zeros(5, 1)), "energy"),
        (dict(energy=torch.tensor([0.0, math.inf, 0, 0, 0])), "energy"),
        (dict(beta=-1.0), "beta"),
        (dict(epsilon_low=1.0), "epsilon_low"),
        (dict(epsilon_high=0.0), "epsilon_high"),
        (dict(max_log_ratio=0.0), "max_log_ratio"),
    ],
)
def test_kvpo_loss_bad_input(kwargs, match):
    uniform = torch.log(torch.ones(5, dtype=torch.float64) / 5)
    arguments = (
        dict(energy=torch.zeros(5), advantages=torch.ones(5), old_log_policy=uniform, ref_log_policy=uniform) | kwargs
    )
    with pytest.raises(ValueError, match=match):
        kvpo_loss(**arguments)


# ---------------------------------------------------------------------------------------------- safety gate
def test_safety_gate_skip():
    decision = safety_gate(torch.tensor([-0.2, 0.0, -1.0]))
    assert decision.fired and decision.skip and decision.scale == 0.0
    decision = safety_gate(torch.tensor([-0.2, 0.01, -1.0]))
    assert not decision.fired and not decision.skip and decision.scale == 1.0
    assert not safety_gate(torch.tensor([-0.2, -1.0]), mode="none").fired


def test_safety_gate_scale_by_hand():
    energy, anchor = [0.4, 0.1, 0.9], 0.05
    decision = safety_gate(
        torch.tensor([-0.3, -0.1, -2.0]), "scale", torch.tensor(energy, dtype=torch.float64), anchor
    )
    pi_anchor = math.exp(-anchor) / (math.exp(-anchor) + sum(math.exp(-e) for e in energy))
    assert decision.fired and not decision.skip
    assert decision.anchor_probability == pytest.approx(pi_anchor, rel=1e-12)
    assert decision.scale == pytest.approx(1 - pi_anchor, rel=1e-12)
    decision = safety_gate(
        torch.tensor([-0.3, 0.2, -2.0]), "scale", torch.tensor(energy), torch.tensor(anchor)
    )  # float32 is fine
    assert not decision.fired and decision.scale == 1.0


def test_safety_gate_on_fused_improvement():
    # every branch below the anchor locally and globally: the improvement (fusion "none") is ≤ 0 everywhere,
    # although the zscore advantages, centred on the branch mean, have a positive entry
    local = anchor_advantages(torch.tensor([0.1, 0.3, 0.2]), torch.tensor(0.5))
    global_ = anchor_advantages(torch.tensor([1.0, 0.4, 0.8]), torch.tensor(1.2))
    assert bool((fuse_advantages(local, global_, "zscore") > 0).any())
    assert safety_gate(fuse_advantages(local, global_, "none", clip=None)).skip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="halve"), "mode"),
        (dict(mode="scale"), "anchor_energy"),
        (dict(mode="scale", energy=torch.zeros(2), anchor_energy=0.0), "energy"),
        (dict(mode="scale", energy=torch.zeros(3), anchor_energy=math.nan), "anchor_energy"),
        (dict(improvement=torch.zeros(3, 1)), "improvement"),
    ],
)
def test_safety_gate_bad_input(kwargs, match):
    arguments = dict(improvement=torch.tensor([-1.0, 0.0, -2.0])) | kwargs
    with pytest.raises(ValueError, match=match):
        safety_gate(**arguments)
