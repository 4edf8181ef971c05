"""The non-finite guard: a NaN in a loss or a rollout stops the run before it reaches the parameters."""

from __future__ import annotations

import math

import pytest
import torch

import agents.hepo as hepo
import agents.rl.loop as loop
from agents.policies.gpr import load_run_model
from agents.rl import checkpoint, trainer
from agents.rl.buffer import Buffer
from gpr_sim.finite import NonFiniteError, check_finite, check_finite_parameters
from gpr_sim.runs import read_metrics
from tests.test_hepo import pre, tiny  # noqa: F401  (the module fixture: a tiny pre-trained generator)


def test_check_finite_names_every_bad_entry():
    check_finite("here", {"a": 1.0, "b": torch.ones(3)})
    with pytest.raises(NonFiniteError, match=r"^iteration 3: non-finite policy, gradient norm$"):
        check_finite(
            "iteration 3", {"policy": math.nan, "critic": 0.5, "gradient norm": torch.tensor(math.inf)}
        )


def test_check_finite_parameters_names_the_parameter():
    net = torch.nn.Linear(2, 2)
    check_finite_parameters("step 1", net)
    with torch.no_grad():
        net.bias[1] = math.nan
    with pytest.raises(NonFiniteError, match="step 1: non-finite parameters bias"):
        check_finite_parameters("step 1", net)


@pytest.mark.parametrize("fused", [False, True], ids=["host check", "fused AdamW, device check"])
def test_nan_in_a_loss_stops_the_run_and_keeps_the_last_good_checkpoint(pre, tmp_path, monkeypatch, fused):  # noqa: F811
    out = tmp_path / "run"
    adamw = torch.optim.AdamW  # CUDA runs take the fused optimiser: its steps are skipped on the device
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: adamw(*a, **{**kw, "fused": fused}))
    real_terms, real_update, now = loop.loss_terms, loop.update, {}

    def update(*a, **kw):  # note the iteration being trained (``draw``: 0-based) and the model before it
        now["iteration"] = kw["draw"] + 1 if "draw" in kw else a[8] + 1
        now["model"] = kw["model"] if "model" in kw else a[1]
        now["before"] = [p.detach().clone() for p in now["model"].parameters()]
        return real_update(*a, **kw)

    def nan_policy_on_iteration_two(*a, **kw):
        terms = real_terms(*a, **kw)
        if now["iteration"] == 2:
            terms["policy"] = terms["policy"] * math.nan
            terms["loss"] = terms["loss"] + terms["policy"]
        return terms

    monkeypatch.setattr(trainer, "update", update)
    monkeypatch.setattr(loop, "loss_terms", nan_policy_on_iteration_two)
    with pytest.raises(NonFiniteError, match=r"iteration 2, epoch 0, minibatch 0: non-finite policy, loss"):
        hepo.main(tiny(pre, out, "--iterations", "3"))
    # no step of the failed update took effect: the model is the one it started from
    for p, before in zip(now["model"].parameters(), now["before"], strict=True):
        torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)
    ckpt = checkpoint.read_checkpoint(out / "checkpoint.pt")
    assert ckpt["iteration"] == 1  # the last good one, written after iteration 1
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["model"].values() if t.is_floating_point())
    model, _ = load_run_model(out)  # policy.pt: the iteration-1 model, finite
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert not (out / "summary.json").exists()


def test_nan_in_the_rollout_stops_before_any_update(pre, tmp_path, monkeypatch):  # noqa: F811
    real = Buffer.concat

    def concat(parts):  # one bad request, as an infinite score or refiner noise would make
        buf = real(parts)
        buf.reward[0, 0] = math.inf
        return buf

    monkeypatch.setattr(Buffer, "concat", staticmethod(concat))
    updates = []
    monkeypatch.setattr(trainer, "update", lambda *a, **kw: updates.append(1))
    with pytest.raises(NonFiniteError, match="rollout ending at env step 2: non-finite reward"):
        hepo.main(tiny(pre, tmp_path / "run", "--iterations", "2"))
    assert updates == []


def test_first_nonfinite_names_the_first_bad_step_and_syncs_once():
    from gpr_sim.finite import FirstNonFinite

    watch = FirstNonFinite("cpu")
    for step, v in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0]):
        watch.see(step, torch.tensor(v))
    with pytest.raises(NonFiniteError, match=r"^fit epoch 1, batch 2: non-finite loss$"):
        watch.check("fit epoch 1", "loss")
    clean = FirstNonFinite("cpu")
    clean.see(0, torch.tensor([1.0, -2.0]))
    clean.check("fit epoch 0", "loss")  # nothing recorded: no error


def test_platform_training_loops_stop_on_a_nan_loss():
    """The platform's stage models (``train_epochs``) and the funnel stop a fit whose loss turns NaN, naming the
    epoch and the first bad batch, though they read the device only once per epoch."""
    from gpr_sim.platform.training import train_epochs

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 2)

    def batch_loss(idx):
        loss = model(x[idx]).square().mean()
        return loss * float("nan") if int(idx.numel()) == 2 else loss  # the last, short batch goes bad

    with pytest.raises(NonFiniteError, match=r"^toy epoch 0, batch 2: non-finite loss$"):
        train_epochs(model, opt, 8, 3, 2, torch.Generator().manual_seed(0), batch_loss, "toy")
