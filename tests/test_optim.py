"""Adamax (torch and stacked) and NVAE's learning-rate schedule, against independent references."""
import copy
import io
import math

import pytest
import torch
from torch import nn

from miselbo.nvae.optim import (ADAMAX_BETAS, ADAMAX_EPS, StackedAdamax, apply_warmup_learning_rate,
                                build_optimizer, build_scheduler, learning_rate,
                                step_scheduler_for_epoch)

LR, WEIGHT_DECAY = 1e-2, 3e-4


class SmallNet(nn.Module):
    """Repeated shapes (stacked together), BN affine parameters, a bias-free conv, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
        self.norm = nn.BatchNorm2d(4)
        self.mix = nn.Conv2d(4, 4, 1, bias=False)
        self.head = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 4)  # never in the graph: its grads stay None

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        h = self.mix(self.norm(h))
        return self.head(h.mean(dim=(2, 3)))


def make_net(seed=0):
    torch.manual_seed(seed)
    return SmallNet()


def batches(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 2, 5, 5, generator=generator) for _ in range(count)]


def train(net, optimizer, inputs, scaler=None):
    for x in inputs:
        optimizer.zero_grad()
        loss = (net(x) - 0.5).pow(2).mean()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


def assert_same_parameters(net_a, net_b, atol=0.0):
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- optimiser

def test_build_optimizer_uses_nvae_settings():
    for fast, expected in ((False, torch.optim.Adamax), (True, StackedAdamax)):
        optimizer = build_optimizer(make_net().parameters(), LR, WEIGHT_DECAY, fast=fast)
        assert type(optimizer) is expected
        group = optimizer.param_groups[0]
        assert (group["lr"], group["weight_decay"], group["eps"], tuple(group["betas"])) == \
            (LR, WEIGHT_DECAY, 1e-3, (0.9, 0.999))


def test_stacked_adamax_equals_torch_adamax_over_several_steps():
    net_torch, net_fast = make_net(), make_net()
    reference = build_optimizer(net_torch.parameters(), LR, WEIGHT_DECAY, fast=False)
    fast = build_optimizer(net_fast.parameters(), LR, WEIGHT_DECAY, fast=True)
    inputs = batches(8)
    train(net_torch, reference, inputs)
    train(net_fast, fast, inputs)
    assert_same_parameters(net_torch, net_fast, atol=1e-6)
    for p_torch, p_fast in zip(net_torch.parameters(), net_fast.parameters()):
        state_torch, state_fast = reference.state[p_torch], fast.state[p_fast]
        assert state_torch.keys() == state_fast.keys()
        for key in state_torch:
            torch.testing.assert_close(state_fast[key], state_torch[key], rtol=0, atol=1e-6)


def test_stacked_adamax_follows_the_formula_written_out_by_hand():
    """θ ← θ − lr/(1 − β₁^t) · m/u with g = ∇ + wd·θ, in float64, one scalar at a time."""
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    grads = [torch.randn(2, 3, generator=generator, dtype=torch.float64) for _ in range(5)]
    params = [nn.Parameter(start.clone()), nn.Parameter(start.clone() * 2)]
    optimizer = StackedAdamax(params, lr=0.05, weight_decay=0.1)
    for grad in grads:
        params[0].grad, params[1].grad = grad.clone(), -grad.clone()
        optimizer.step()
    beta1, beta2 = ADAMAX_BETAS
    for index, (sign, scale) in enumerate(((1, 1), (-1, 2))):
        for flat in range(6):
            theta, m, u = scale * start.view(-1)[flat].item(), 0.0, 0.0
            for t, grad in enumerate(grads, start=1):
                g = sign * grad.view(-1)[flat].item() + 0.1 * theta
                m = beta1 * m + (1 - beta1) * g
                u = max(beta2 * u, abs(g) + ADAMAX_EPS)
                theta -= 0.05 / (1 - beta1 ** t) * m / u
            assert params[index].view(-1)[flat].item() == pytest.approx(theta, rel=1e-12, abs=1e-14)


def test_frozen_and_gradient_free_parameters_stay_bit_identical():
    net = make_net()
    frozen = [net.blocks[1].weight, net.blocks[1].bias, net.norm.weight, net.mix.weight]
    for param in frozen:  # blocks[1] shares shapes with trainable blocks; mix.weight is unique
        param.requires_grad_(False)
    untouched = frozen + list(net.unused.parameters())
    before = [param.detach().clone() for param in untouched]
    optimizer = build_optimizer(net.parameters(), LR, WEIGHT_DECAY, fast=True)
    train(net, optimizer, batches(4))
    net.mix.weight.grad = torch.ones_like(net.mix.weight)  # a stale gradient must not be used
    optimizer.step()
    for param, original in zip(untouched, before):
        assert torch.equal(param, original)
        assert param not in optimizer.state
    assert not torch.equal(net.blocks[0].weight, make_net().blocks[0].weight)


def test_per_parameter_step_counts_match_torch_when_a_parameter_skips_steps():
    params_torch = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3) * 2)]
    params_fast = [nn.Parameter(p.detach().clone()) for p in params_torch]
    reference = torch.optim.Adamax(params_torch, lr=LR, eps=ADAMAX_EPS, weight_decay=WEIGHT_DECAY)
    fast = StackedAdamax(params_fast, lr=LR, weight_decay=WEIGHT_DECAY)
    for step in range(6):
        for params, optimizer in ((params_torch, reference), (params_fast, fast)):
            params[0].grad = torch.full((3,), 0.3 * (step + 1))
            params[1].grad = torch.full((3,), -0.2) if step % 2 else None
            optimizer.step()
    for p_torch, p_fast in zip(params_torch, params_fast):
        torch.testing.assert_close(p_fast, p_torch, rtol=0, atol=1e-6)
    assert fast.state[params_fast[1]]["step"].item() == 3.0


def round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("save_with, resume_with", [(True, True), (False, True), (True, False)])
def test_state_dict_round_trip_continues_identically(save_with, resume_with):
    """fast/torch state dicts share one format: saving mid-run and resuming changes nothing."""
    inputs = batches(7)
    net = make_net()
    optimizer = build_optimizer(net.parameters(), LR, WEIGHT_DECAY, fast=save_with)
    train(net, optimizer, inputs[:3])
    saved_net, saved_state = copy.deepcopy(net.state_dict()), round_trip(optimizer.state_dict())
    train(net, optimizer, inputs[3:])

    resumed = make_net(seed=5)
    resumed.load_state_dict(saved_net)
    resumed_optimizer = build_optimizer(resumed.parameters(), LR, WEIGHT_DECAY, fast=resume_with)
    resumed_optimizer.load_state_dict(saved_state)
    train(resumed, resumed_optimizer, inputs[3:])
    assert_same_parameters(net, resumed, atol=0.0 if save_with == resume_with else 1e-6)


def test_stacked_adamax_works_under_a_grad_scaler():
    net_torch, net_fast = make_net(), make_net()
    inputs = batches(4)
    for net, fast in ((net_torch, False), (net_fast, True)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        train(net, build_optimizer(net.parameters(), LR, WEIGHT_DECAY, fast=fast), inputs, scaler)
    assert_same_parameters(net_torch, net_fast, atol=1e-6)


def test_stacked_adamax_rejects_bad_settings():
    with pytest.raises(ValueError, match="betas"):
        StackedAdamax([nn.Parameter(torch.ones(1))], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="weight_decay"):
        StackedAdamax([nn.Parameter(torch.ones(1))], weight_decay=-1.0)


def test_stacked_adamax_on_the_test_device(test_device):
    params_torch = [nn.Parameter(torch.randn(4, 3, device=test_device)) for _ in range(3)]
    params_fast = [nn.Parameter(p.detach().clone()) for p in params_torch]
    reference = build_optimizer(params_torch, LR, WEIGHT_DECAY, fast=False)
    fast = build_optimizer(params_fast, LR, WEIGHT_DECAY, fast=True)
    for step in range(3):
        for params, optimizer in ((params_torch, reference), (params_fast, fast)):
            for index, param in enumerate(params):
                param.grad = torch.full_like(param, (index + 1) * (step - 1.5))
            optimizer.step()
    for p_torch, p_fast in zip(params_torch, params_fast):
        torch.testing.assert_close(p_fast, p_torch, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- learning rate

def simulate_nvae_schedule(epochs, warmup_epochs, iterations_per_epoch, peak_lr=1e-2,
                           min_lr=1e-4, resume_at_epoch=None):
    """The lr of every update as NVAE's loop sets it: torch CosineAnnealingLR + warm-up rule."""
    def fresh():
        optimizer = torch.optim.Adamax([nn.Parameter(torch.zeros(1))], lr=peak_lr, eps=ADAMAX_EPS)
        return optimizer, build_scheduler(optimizer, epochs, warmup_epochs, min_lr)

    optimizer, scheduler = fresh()
    used, global_step = [], 0
    for epoch in range(epochs):
        if epoch == resume_at_epoch:  # checkpoint at the end of the previous epoch, then resume
            saved = round_trip(optimizer.state_dict()), round_trip(scheduler.state_dict())
            optimizer, scheduler = fresh()
            optimizer.load_state_dict(saved[0])
            scheduler.load_state_dict(saved[1])
        step_scheduler_for_epoch(scheduler, epoch, warmup_epochs)
        for _ in range(iterations_per_epoch):
            apply_warmup_learning_rate(optimizer, global_step, iterations_per_epoch * warmup_epochs,
                                       peak_lr)
            used.append((epoch, global_step, optimizer.param_groups[0]["lr"]))
            optimizer.step()  # no gradient: changes nothing, keeps the step-order check quiet
            global_step += 1
    return used


@pytest.mark.parametrize("epochs, warmup_epochs, iterations", [
    (8, 2, 3), (6, 0, 2), (5, 1, 4), (3, 2, 2), (4, 2, 1), (2, 0, 3), (1, 0, 2), (2, 3, 2),
])
def test_pure_learning_rate_equals_torch_scheduler_with_warm_up(epochs, warmup_epochs, iterations):
    for epoch, global_step, lr_used in simulate_nvae_schedule(epochs, warmup_epochs, iterations):
        pure = learning_rate(epoch, global_step, peak_lr=1e-2, min_lr=1e-4,
                             warmup_epochs=warmup_epochs, epochs=epochs,
                             iterations_per_epoch=iterations)
        assert pure == pytest.approx(lr_used, rel=1e-12, abs=1e-15), (epoch, global_step)


def test_schedule_survives_a_checkpoint_round_trip():
    uninterrupted = simulate_nvae_schedule(8, 2, 3)
    assert simulate_nvae_schedule(8, 2, 3, resume_at_epoch=4) == uninterrupted


def test_learning_rate_landmarks():
    schedule = dict(peak_lr=0.01, min_lr=1e-4, warmup_epochs=2, epochs=8, iterations_per_epoch=5)
    assert learning_rate(0, 0, **schedule) == 0.0  # the very first update uses lr 0
    assert learning_rate(1, 7, **schedule) == pytest.approx(0.01 * 7 / 10)
    assert learning_rate(2, 12, **schedule) == pytest.approx(0.01 * 9 / 10)  # η_W, untouched
    midpoint = learning_rate(5, 27, **schedule)  # k = 3, T = 5
    expected = 1e-4 + (0.009 - 1e-4) * (1 + math.cos(math.pi * 3 / 5)) / 2
    assert midpoint == pytest.approx(expected, rel=1e-12)
    assert learning_rate(7, 39, **schedule) == pytest.approx(1e-4, rel=1e-12)  # last epoch
    no_warmup = dict(schedule, warmup_epochs=0)
    assert learning_rate(0, 0, **no_warmup) == 0.01
    assert learning_rate(7, 39, **no_warmup) == pytest.approx(1e-4, rel=1e-12)


@pytest.mark.parametrize("epoch, step, iterations", [(8, 0, 5), (-1, 0, 5), (0, 0, 0), (0, -1, 5)])
def test_learning_rate_rejects_out_of_range_input(epoch, step, iterations):
    with pytest.raises(ValueError, match="learning_rate"):
        learning_rate(epoch, step, peak_lr=0.01, min_lr=1e-4, warmup_epochs=2, epochs=8,
                      iterations_per_epoch=iterations)
