"""Optimizer state follows the mapping: resume training after a refactor as if nothing happened."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from training_models import D_IN, D_OUT, NewModel, OldModel, entry, refactor_plan
from weight_mapper import MappingPlan, WeightRenamer
from weight_mapper.apply import apply_plan
from weight_mapper.cli import main
from weight_mapper.errors import ConversionError
from weight_mapper.training_state import (
    checkpoint_parameter_order,
    convert_training_state,
    describe_training_state,
    drop_training_state,
    parameter_order,
)

_BATCH, _SEQ = 4, 6
_N_BEFORE, _N_AFTER = 4, 5


@pytest.fixture(autouse=True)
def _float64_and_seed():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # "to float precision": float64 leaves no room for kernel noise
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(_BATCH, _SEQ, D_IN, generator=g), torch.randn(_BATCH, D_OUT, generator=g))
            for _ in range(n)]


def _step(model, optimizer, scheduler, batch):
    x, y = batch
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _make_optimizer(kind, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)


def _train_and_checkpoint(kind):
    """Train OldModel a few steps, save a Lightning-style checkpoint, then keep training it."""
    old = OldModel()
    optimizer = _make_optimizer(kind, old.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    batches = _batches(_N_BEFORE + _N_AFTER)
    for batch in batches[:_N_BEFORE]:
        _step(old, optimizer, scheduler, batch)
    checkpoint = {  # what Lightning writes, without depending on it
        "epoch": 0, "global_step": _N_BEFORE, "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v.clone() for k, v in old.state_dict().items()},
        "optimizer_states": [_clone(optimizer.state_dict())],
        "lr_schedulers": [scheduler.state_dict()],
        "hyper_parameters": {"lr": 1e-2},
    }
    losses = [_step(old, optimizer, scheduler, batch) for batch in batches[_N_BEFORE:]]
    return checkpoint, old, losses, batches


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _resume(kind, path, batches):
    saved = torch.load(path, weights_only=True)
    new = NewModel()
    new.load_state_dict(saved["state_dict"], strict=True)
    optimizer = _make_optimizer(kind, new.parameters())
    optimizer.load_state_dict(saved["optimizer_states"][0])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    scheduler.load_state_dict(saved["lr_schedulers"][0])
    losses = [_step(new, optimizer, scheduler, batch) for batch in batches[_N_BEFORE:]]
    return new, losses, saved


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_resumed_training_matches_the_original_run(tmp_path, kind):
    checkpoint, old, old_losses, batches = _train_and_checkpoint(kind)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    renamer = WeightRenamer(tmp_path / "old.ckpt")
    renamer.rename_keys(refactor_plan())
    report = renamer.convert_training_state(NewModel())  # source order: the checkpoint's, buffers left out
    assert report.ok, report.message()
    renamer.save(tmp_path / "new.ckpt", keep_envelope=True)

    new, new_losses, saved = _resume(kind, tmp_path / "new.ckpt", batches)
    # float64: the fused matmul rounds differently from three small ones, by ~1e-11 after Adam's scaling.
    assert new_losses == pytest.approx(old_losses, rel=1e-9, abs=1e-9)
    expected = apply_plan(refactor_plan(prefix=""), old.state_dict())
    for name, value in new.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    assert saved["epoch"] == 0 and saved["global_step"] == _N_BEFORE and saved["hyper_parameters"] == {"lr": 1e-2}
    assert saved["lr_schedulers"] == checkpoint["lr_schedulers"]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_resume_test_can_fail(tmp_path, kind):
    """Without the converted state (a fresh optimizer) the same weights train measurably differently,
    and the unconverted state does not even load."""
    checkpoint, _, old_losses, batches = _train_and_checkpoint(kind)
    renamer = WeightRenamer(checkpoint)
    renamer.rename_keys(refactor_plan())
    renamer.save(tmp_path / "weights.ckpt", keep_envelope=True, training_state="drop")
    saved = torch.load(tmp_path / "weights.ckpt", weights_only=True)
    saved["optimizer_states"] = [_make_optimizer(kind, NewModel().parameters()).state_dict()]
    saved["lr_schedulers"] = checkpoint["lr_schedulers"]
    torch.save(saved, tmp_path / "fresh.ckpt")
    _, fresh_losses, _ = _resume(kind, tmp_path / "fresh.ckpt", batches)
    assert max(abs(a - b) for a, b in zip(fresh_losses, old_losses)) > 1e-4
    optimizer = _make_optimizer(kind, NewModel().parameters())
    with pytest.raises(ValueError):  # q/k/v fused: torch refuses the group sizes
        optimizer.load_state_dict(checkpoint["optimizer_states"][0])


def test_source_model_gives_the_order(tmp_path):
    checkpoint, _, old_losses, batches = _train_and_checkpoint("adamw")
    renamer = WeightRenamer(checkpoint)
    renamer.rename_keys(refactor_plan())
    assert renamer.convert_training_state(NewModel(), source_model=OldModel()).ok
    renamer.save(tmp_path / "new.ckpt", keep_envelope=True)
    _, new_losses, _ = _resume("adamw", tmp_path / "new.ckpt", batches)
    assert new_losses == pytest.approx(old_losses, rel=1e-12, abs=1e-12)


def test_a_plain_training_checkpoint(tmp_path):
    """``{"model": ..., "optimizer": ..., "scheduler": ...}``, as hand-written training loops save it."""
    lightning, _, old_losses, batches = _train_and_checkpoint("sgd")
    torch.save({"model": {k.removeprefix("model."): v for k, v in lightning["state_dict"].items()},
                "optimizer": lightning["optimizer_states"][0], "scheduler": lightning["lr_schedulers"][0],
                "epoch": 0}, tmp_path / "plain.pt")
    renamer = WeightRenamer(tmp_path / "plain.pt")
    assert renamer.state_key == "model"
    renamer.rename_keys(refactor_plan(prefix=""))
    report = renamer.convert_training_state(NewModel())
    assert report.ok and [o.location for o in report.optimizers] == ["optimizer"] and report.schedulers == ("scheduler",)
    renamer.save(tmp_path / "new.pt", keep_envelope=True)
    saved = torch.load(tmp_path / "new.pt", weights_only=True)
    torch.save({"state_dict": saved["model"], "optimizer_states": [saved["optimizer"]],
                "lr_schedulers": [saved["scheduler"]]}, tmp_path / "as_lightning.ckpt")
    _, new_losses, _ = _resume("sgd", tmp_path / "as_lightning.ckpt", batches)
    assert new_losses == pytest.approx(old_losses, rel=1e-9, abs=1e-9)


def test_inverse_plan_converts_the_state_back_exactly():
    checkpoint, *_ = _train_and_checkpoint("adamw")
    plan = refactor_plan()
    source_order, _ = checkpoint_parameter_order(checkpoint["state_dict"])
    target_order = parameter_order(NewModel())
    there, report = convert_training_state(checkpoint, plan, source_param_order=source_order,
                                           target_param_order=target_order)
    back, report_back = convert_training_state(there, plan.inverse(), source_param_order=target_order,
                                               target_param_order=source_order)
    assert report.ok and report_back.ok
    original, restored = checkpoint["optimizer_states"][0], back["optimizer_states"][0]
    assert restored["param_groups"] == original["param_groups"]
    assert restored["state"].keys() == original["state"].keys()
    for index, state in original["state"].items():
        assert restored["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
    assert back["lr_schedulers"] == checkpoint["lr_schedulers"]


def test_converted_checkpoint_converts_back_through_the_renamer(tmp_path):
    """There and back through files: the inverse plan, the models as the orders (the target's
    names under the checkpoint's ``model.`` wrapper are found)."""
    checkpoint, *_ = _train_and_checkpoint("adamw")
    torch.save(checkpoint, tmp_path / "old.ckpt")
    forward = WeightRenamer(tmp_path / "old.ckpt")
    forward.rename_keys(refactor_plan())
    assert forward.convert_training_state(NewModel(), source_model=OldModel()).ok
    forward.save(tmp_path / "new.ckpt", keep_envelope=True)
    backward = WeightRenamer(tmp_path / "new.ckpt")
    backward.rename_keys(refactor_plan().inverse())
    assert backward.convert_training_state(OldModel(), source_model=NewModel()).ok
    backward.save(tmp_path / "back.ckpt", keep_envelope=True)
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)["optimizer_states"][0]
    original = checkpoint["optimizer_states"][0]
    assert back["param_groups"] == original["param_groups"]
    assert all(torch.equal(back["state"][i][k], v) for i, s in original["state"].items() for k, v in s.items())


def test_fused_state_is_the_concatenation_of_the_parts():
    checkpoint, *_ = _train_and_checkpoint("adamw")
    order, _ = checkpoint_parameter_order(checkpoint["state_dict"])
    out, _ = convert_training_state(checkpoint, refactor_plan(), source_param_order=order,
                                    target_param_order=parameter_order(NewModel()))
    old_state, new_state = checkpoint["optimizer_states"][0]["state"], out["optimizer_states"][0]["state"]
    new_order = parameter_order(NewModel())
    qkv = new_state[new_order.index("attn.qkv.weight")]
    parts = [old_state[order.index(f"model.{n}.weight")] for n in "qkv"]
    assert torch.equal(qkv["exp_avg_sq"], torch.cat([p["exp_avg_sq"] for p in parts]))
    assert torch.equal(qkv["step"], parts[0]["step"])
    head = new_state[new_order.index("head_weight")]
    assert torch.equal(head["exp_avg"], old_state[order.index("model.head.weight")]["exp_avg"].t())


# ------------------------------------------------------------------------------------ refusals


def _two_params_plan(transform="concat"):
    return MappingPlan((entry(["a", "b"], "ab", (2,), transform, (4,), {"dim": 0, "sizes": [2, 2]}),))


def _adam_state(steps, groups=None):
    state = {i: {"step": torch.tensor(float(s)), "exp_avg": torch.full((2,), float(i)),
                 "exp_avg_sq": torch.ones(2)} for i, s in enumerate(steps)}
    return {"optimizer": {"state": state, "param_groups": groups or [{"params": [0, 1], "lr": 0.1}]}}


def test_fused_parts_with_different_steps_are_refused():
    out, report = convert_training_state(_adam_state([3, 5]), _two_params_plan(), source_param_order=["a", "b"],
                                         target_param_order=["ab"])
    assert not report.ok and "disagree on 'step'" in report.optimizers[0].reason and "[3.0, 5.0]" in report.message()
    assert "optimizer" not in out  # never passed on unchanged


def test_fused_parts_with_and_without_state_are_refused():
    envelope = _adam_state([3, 3])
    del envelope["optimizer"]["state"][1]  # b never had a gradient
    _, report = convert_training_state(envelope, _two_params_plan(), source_param_order=["a", "b"],
                                       target_param_order=["ab"])
    assert not report.ok and "carry different state" in report.message()


def test_fused_parts_from_different_groups_are_refused():
    groups = [{"params": [0], "lr": 0.1}, {"params": [1], "lr": 0.01}]
    _, report = convert_training_state(_adam_state([3, 3], groups), _two_params_plan(),
                                       source_param_order=["a", "b"], target_param_order=["ab"])
    assert not report.ok and "param_groups [0, 1]" in report.optimizers[0].reason


def test_groups_keep_their_options_and_new_parameters_start_empty():
    groups = [{"params": [0], "lr": 0.1, "weight_decay": 0.0}, {"params": [1], "lr": 0.01, "weight_decay": 0.5}]
    plan = MappingPlan((entry("a", "x", (2,)), entry("b", "y", (2,))))
    out, report = convert_training_state(_adam_state([3, 3], groups), plan, source_param_order=["a", "b"],
                                         target_param_order=["new", "y", "x"])
    osd = out["optimizer"]
    # Group by group, each in the target order; "new" has no source and joins the first group.
    assert osd["param_groups"] == [{"lr": 0.1, "weight_decay": 0.0, "params": [0, 1]},
                                   {"lr": 0.01, "weight_decay": 0.5, "params": [2]}]
    assert sorted(osd["state"]) == [1, 2] and torch.equal(osd["state"][2]["exp_avg"], torch.full((2,), 1.0))
    assert report.optimizers[0].fresh == ("new",) and "start with empty state" in report.message()


def test_several_groups_need_an_explicit_order(tmp_path):
    """A decay / no-decay split: a model's parameter order says nothing about the groups."""
    model = OldModel()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    model(torch.randn(2, 3, D_IN)).sum().backward()
    optimizer.step()
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                  "optimizer_states": [optimizer.state_dict()]}
    renamer = WeightRenamer(checkpoint)
    renamer.rename_keys(refactor_plan())
    report = renamer.convert_training_state(NewModel(), source_model=OldModel())
    assert not report.ok and "2 param_groups" in report.message()
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    order = [n for n in names if n.endswith("weight")] + [n for n in names if not n.endswith("weight")]
    report = renamer.convert_training_state(NewModel(), source_param_order=order)
    assert report.ok, report.message()
    renamer.save(tmp_path / "new.ckpt", keep_envelope=True)
    saved = torch.load(tmp_path / "new.ckpt", weights_only=True)["optimizer_states"][0]
    # Each group keeps its options and lists its target parameters in the target's order.
    new = NewModel()
    new_decay = [p for n, p in new.named_parameters() if n.endswith("weight")]
    new_no_decay = [p for n, p in new.named_parameters() if not n.endswith("weight")]
    resumed = torch.optim.AdamW([{"params": new_decay}, {"params": new_no_decay, "weight_decay": 0.0}])
    resumed.load_state_dict(saved)
    assert [g["weight_decay"] for g in resumed.param_groups] == [0.01, 0.0]
    qkv = resumed.state[new.attn["qkv"].weight]["exp_avg"]
    assert torch.equal(qkv, torch.cat([optimizer.state[getattr(model, n).weight]["exp_avg"] for n in "qkv"]))
    assert torch.equal(resumed.state[new.head_weight]["exp_avg"], optimizer.state[model.head.weight]["exp_avg"].t())


def test_a_wrong_order_is_refused_by_the_state_shapes():
    envelope = {"optimizer": {"state": {0: {"momentum_buffer": torch.ones(3, 2)}, 1: {"momentum_buffer": torch.ones(3)}},
                              "param_groups": [{"params": [0, 1], "lr": 0.1}]}}
    plan = MappingPlan((entry("w", "w", (3, 2)), entry("b", "b", (3,))))
    _, report = convert_training_state(envelope, plan, source_param_order=["b", "w"], target_param_order=["w", "b"])
    assert not report.ok and "the order is wrong" in report.optimizers[0].reason


def test_a_count_mismatch_is_refused():
    _, report = convert_training_state(_adam_state([1, 1]), _two_params_plan(), source_param_order=["a", "b", "c"],
                                       target_param_order=["ab"])
    assert not report.ok and "holds 2 parameters but the source parameter order has 3" in report.message()


def test_state_that_is_not_per_parameter_is_refused():
    model = nn.Linear(2, 2)
    lbfgs = torch.optim.LBFGS(model.parameters())

    def closure():
        lbfgs.zero_grad()
        loss = model(torch.ones(1, 2)).sum() ** 2
        loss.backward()
        return loss

    lbfgs.step(closure)
    plan = MappingPlan((entry("weight", "weight", (2, 2)), entry("bias", "bias", (2,))))
    out, report = convert_training_state({"optimizer": lbfgs.state_dict()}, plan,
                                         source_param_order=["weight", "bias"], target_param_order=["weight", "bias"])
    assert not report.ok and "optimizer" not in out
    _, report = convert_training_state({"optimizer": [1, 2, 3]}, plan, source_param_order=["weight", "bias"],
                                       target_param_order=["weight", "bias"])
    assert "not a torch optimizer state dict" in report.message()
    out, report = convert_training_state({"optimizer_states": [], "optimizer": None}, plan,
                                         source_param_order=["weight"], target_param_order=["weight"])
    assert report.ok and not report.optimizers and out == {"optimizer_states": [], "optimizer": None}


def test_without_a_target_model_the_state_is_left_out_with_a_warning(tmp_path):
    checkpoint, *_ = _train_and_checkpoint("sgd")
    renamer = WeightRenamer(checkpoint)
    renamer.rename_keys(refactor_plan())
    with pytest.warns(UserWarning, match="target model's parameter order is unknown"):
        renamer.save(tmp_path / "new.ckpt", keep_envelope=True)
    saved = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert "optimizer_states" not in saved and saved["global_step"] == _N_BEFORE
    assert renamer.training_report is not None and not renamer.training_report.ok


def test_safetensors_source_order_is_not_trusted():
    order, why = checkpoint_parameter_order({"b": torch.ones(1), "a": torch.ones(1)}, ordered=False)
    assert order is None and "sorted by name" in why


def test_checkpoint_order_leaves_out_buffers_and_ties():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    model[2].weight = model[0].weight
    assert checkpoint_parameter_order(model.state_dict())[0] == parameter_order(model)


def test_weights_only_drops_the_training_state(tmp_path):
    checkpoint, *_ = _train_and_checkpoint("adamw")
    renamer = WeightRenamer(checkpoint)
    renamer.rename_keys(refactor_plan())
    renamer.save(tmp_path / "new.ckpt", keep_envelope=True, training_state="drop")
    saved = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert sorted(saved) == ["epoch", "global_step", "hyper_parameters", "pytorch-lightning_version", "state_dict"]
    assert drop_training_state({"optimizer": {}, "scaler": {}, "x": 1}) == {"x": 1}
    with pytest.raises(ConversionError, match="expected 'convert' or 'drop'"):
        renamer.save(tmp_path / "other.ckpt", keep_envelope=True, training_state="keep")


def test_several_optimizers_each_with_its_own_order(tmp_path):
    """A GAN-style Lightning module: one optimizer per sub-network, orders given per optimizer."""
    g, d = nn.Linear(2, 3), nn.Linear(3, 1)
    opt_g, opt_d = torch.optim.Adam(g.parameters()), torch.optim.SGD(d.parameters(), lr=0.1, momentum=0.5)
    for _ in range(2):
        loss = d(g(torch.randn(4, 2))).pow(2).mean()
        opt_g.zero_grad(), opt_d.zero_grad()
        loss.backward()
        opt_g.step(), opt_d.step()
    envelope = {"optimizer_states": [opt_g.state_dict(), opt_d.state_dict()], "lr_schedulers": []}
    plan = MappingPlan((entry("g.weight", "gen.weight", (3, 2), "transpose", (2, 3)), entry("g.bias", "gen.bias", (3,)),
                        entry("d.weight", "disc.weight", (1, 3)), entry("d.bias", "disc.bias", (1,))))
    out, report = convert_training_state(
        envelope, plan, source_param_order=[["g.weight", "g.bias"], ["d.weight", "d.bias"]],
        target_param_order=[["gen.bias", "gen.weight"], ["disc.weight", "disc.bias"]])
    assert report.ok and [o.location for o in report.optimizers] == ["optimizer_states[0]", "optimizer_states[1]"]
    gen = out["optimizer_states"][0]["state"]
    assert torch.equal(gen[1]["exp_avg"], opt_g.state_dict()["state"][0]["exp_avg"].t())
    assert torch.equal(out["optimizer_states"][1]["state"][0]["momentum_buffer"],
                       opt_d.state_dict()["state"][0]["momentum_buffer"])
    # One refused optimizer takes its list with it: the list must stay aligned with the optimizers.
    out, report = convert_training_state(
        envelope, plan, source_param_order=[["g.weight", "g.bias"], ["d.bias", "d.weight"]],
        target_param_order=[["gen.bias", "gen.weight"], ["disc.weight", "disc.bias"]])
    assert "optimizer_states" not in out and out["lr_schedulers"] == []
    assert [o.converted for o in report.optimizers] == [False, False]
    assert "left out with the rest of optimizer_states" in report.optimizers[0].reason
    assert "the order is wrong" in report.optimizers[1].reason
    with pytest.raises(ConversionError, match="3 lists but the checkpoint holds 2"):
        convert_training_state(envelope, plan, source_param_order=[["a"], ["b"], ["c"]], target_param_order=["x"])


# ------------------------------------------------------------------------------------ Adafactor


def _adafactor_state(model, n_steps=3):
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    for _ in range(n_steps):
        optimizer.zero_grad()
        model(torch.randn(4, model.in_features)).pow(2).mean().backward()
        optimizer.step()
    return optimizer


def test_adafactor_transpose_swaps_the_factors_and_resumes():
    old = nn.Linear(4, 3)
    optimizer = _adafactor_state(old)
    plan = MappingPlan((entry("weight", "w_t", (3, 4), "transpose", (4, 3)), entry("bias", "b", (3,))))
    out, report = convert_training_state({"optimizer": optimizer.state_dict()}, plan,
                                         source_param_order=["weight", "bias"], target_param_order=["w_t", "b"])
    assert report.ok
    w_t = nn.Parameter(old.weight.detach().t().clone())
    b = nn.Parameter(old.bias.detach().clone())
    new_optimizer = torch.optim.Adafactor([w_t, b], lr=1e-2)
    new_optimizer.load_state_dict(out["optimizer"])
    x = torch.randn(4, 4)
    for _ in range(3):
        for opt, loss in ((optimizer, old(x).pow(2).mean()), (new_optimizer, (x @ w_t + b).pow(2).mean())):
            opt.zero_grad()
            loss.backward()
            opt.step()
    # mean(row_var) and mean(col_var) are the same number computed two ways: equal to rounding.
    torch.testing.assert_close(w_t.detach().t(), old.weight.detach(), rtol=1e-12, atol=1e-12)


def test_adafactor_factored_state_under_a_row_concat_is_reset_and_reported():
    model = nn.Linear(4, 2)
    optimizer = _adafactor_state(model)
    state = optimizer.state_dict()
    # The weight and a copy of it fused along rows: the factored column moment cannot be split exactly.
    envelope = {"optimizer": {"state": {0: state["state"][0], 1: {k: v.clone() for k, v in state["state"][0].items()}},
                              "param_groups": [{**state["param_groups"][0], "params": [0, 1]}]}}
    plan = MappingPlan((entry(["a", "b"], "ab", (2, 4), "concat", (4, 4),
                               {"dim": 0, "sizes": [2, 2], "source_shapes": [[2, 4], [2, 4]]}),))
    out, report = convert_training_state(envelope, plan, source_param_order=["a", "b"], target_param_order=["ab"])
    assert report.ok and report.optimizers[0].reset[0][0] == "ab"
    assert "cannot follow concat" in report.message() and out["optimizer"]["state"] == {}


def test_adafactor_stacked_experts_keep_their_factors():
    parts = {i: {"step": torch.tensor(2.0), "row_var": torch.rand(3, 1), "col_var": torch.rand(1, 4)} for i in range(2)}
    envelope = {"optimizer": {"state": parts, "param_groups": [{"params": [0, 1], "beta2_decay": -0.8}]}}
    plan = MappingPlan((entry(["e0", "e1"], "experts", (3, 4), "stack", (2, 3, 4),
                               {"dim": 0, "source_shapes": [[3, 4], [3, 4]]}),))
    out, report = convert_training_state(envelope, plan, source_param_order=["e0", "e1"], target_param_order=["experts"])
    assert report.ok and not report.optimizers[0].reset
    assert torch.equal(out["optimizer"]["state"][0]["row_var"], torch.stack([parts[0]["row_var"], parts[1]["row_var"]]))
    back, _ = convert_training_state(out, plan.inverse(), source_param_order=["experts"], target_param_order=["e0", "e1"])
    assert all(torch.equal(back["optimizer"]["state"][i][k], parts[i][k]) for i in range(2) for k in parts[i])


def test_describe_training_state():
    checkpoint, *_ = _train_and_checkpoint("adamw")
    info = describe_training_state({k: v for k, v in checkpoint.items() if k != "state_dict"})
    assert info["optimizers"] == [{"location": "optimizer_states[0]", "kind": "AdamW", "n_groups": 1, "n_params": 14,
                                   "n_states": 14, "state_keys": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]}]
    assert info["n_schedulers"] == 1 and info["global_step"] == _N_BEFORE and info["epoch"] == 0


# ------------------------------------------------------------------------------------ command line


@pytest.fixture
def lightning_files(tmp_path):
    checkpoint, _, old_losses, batches = _train_and_checkpoint("adamw")
    torch.save(checkpoint, tmp_path / "last.ckpt")
    refactor_plan().to_json(tmp_path / "plan.json")
    return tmp_path, old_losses, batches


def test_cli_inspect_shows_the_training_state(lightning_files, capsys):
    folder, *_ = lightning_files
    assert main(["inspect", str(folder / "last.ckpt"), "--json"]) == 0
    training = json.loads(capsys.readouterr().out)["training_state"]
    assert training["optimizers"][0]["kind"] == "AdamW" and training["optimizers"][0]["n_states"] == 14
    assert training["schedulers"] == ["lr_schedulers"] and training["global_step"] == _N_BEFORE
    assert main(["inspect", str(folder / "last.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "optimizer_states[0]: AdamW, 14 parameters in 1 group(s)" in out and "1 in lr_schedulers" in out


def test_cli_apply_converts_the_optimizer_state_and_training_resumes(lightning_files, capsys):
    folder, old_losses, batches = lightning_files
    argv = ["apply", str(folder / "last.ckpt"), str(folder / "plan.json"), "-o", str(folder / "new.ckpt"),
            "--validate", "training_models:NewModel", "--strict", "--json"]
    assert main(argv) == 0
    training = json.loads(capsys.readouterr().out)["training_state"]
    assert training["ok"] and training["optimizers"][0]["n_states"] == 10 and training["schedulers"] == ["lr_schedulers"]
    _, new_losses, _ = _resume("adamw", folder / "new.ckpt", batches)
    assert new_losses == pytest.approx(old_losses, rel=1e-9, abs=1e-9)
    # The source model gives the order too; the human output says what happened.
    assert main([*argv[:-1], "-o", str(folder / "again.ckpt"), "--source-model", "training_models:OldModel"]) == 0
    assert "Optimizer state: optimizer_states[0]: converted (10 parameters, 10 with state)" in capsys.readouterr().out


def test_cli_apply_without_a_target_leaves_the_optimizer_state_out(lightning_files, capsys):
    folder, *_ = lightning_files
    assert main(["apply", str(folder / "last.ckpt"), str(folder / "plan.json"), "-o", str(folder / "new.ckpt")]) == 0
    err = capsys.readouterr().err
    assert "the optimizer state was not converted and is left out" in err and "--validate TARGET" in err
    saved = torch.load(folder / "new.ckpt", weights_only=True)
    assert "optimizer_states" not in saved and "lr_schedulers" in saved


def test_cli_apply_weights_only(lightning_files, capsys):
    folder, *_ = lightning_files
    assert main(["apply", str(folder / "last.ckpt"), str(folder / "plan.json"), "-o", str(folder / "w.ckpt"),
                 "--weights-only"]) == 0
    assert "optimizer" not in capsys.readouterr().err
    saved = torch.load(folder / "w.ckpt", weights_only=True)
    assert "optimizer_states" not in saved and "lr_schedulers" not in saved and saved["global_step"] == _N_BEFORE
    assert main(["apply", str(folder / "last.ckpt"), str(folder / "plan.json"), "-o", str(folder / "x.ckpt"),
                 "--weights-only", "--source-model", "training_models:OldModel"]) == 2


# ------------------------------------------------------------------------------------ properties


@st.composite
def plans_with_state(draw):
    """A random plan (copies, transposes, reshapes, concats, stacks), both parameter orders
    shuffled, and Adam-like state for every source parameter (equal steps within a fused target)."""
    entries, source_shapes = [], {}
    for t in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["identity", "transpose", "reshape", "concat", "stack"]))
        rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        n = draw(st.integers(2, 3)) if kind in ("concat", "stack") else 1
        sizes = [draw(st.integers(1, 3)) for _ in range(n)] if kind == "concat" else [rows] * n
        shapes = [(size, cols) for size in sizes]
        names = [f"s{t}_{i}" for i in range(n)]
        source_shapes.update(zip(names, shapes))
        target_shape, args = {
            "identity": ((rows, cols), {}),
            "transpose": ((cols, rows), {}),
            "reshape": ((rows * cols,), {"shape": [rows * cols]}),
            "concat": ((sum(sizes), cols), {"dim": 0, "sizes": sizes, "source_shapes": [list(s) for s in shapes]}),
            "stack": ((n, rows, cols), {"dim": 0, "source_shapes": [list(s) for s in shapes]}),
        }[kind]
        entries.append(entry(names, f"t{t}", shapes[0], None if kind == "identity" else kind, target_shape, args))
    source_order = draw(st.permutations(sorted(source_shapes)))
    target_order = draw(st.permutations([e.target for e in entries]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    state = {}
    for e in entries:
        step = float(draw(st.integers(1, 9)))
        for name in e.source:
            state[source_order.index(name)] = {"step": torch.tensor(step),
                                               "exp_avg": torch.randn(source_shapes[name], generator=g),
                                               "exp_avg_sq": torch.rand(source_shapes[name], generator=g)}
    envelope = {"optimizer": {"state": state, "param_groups": [{"params": list(range(len(source_order))),
                                                                "lr": 0.1, "betas": (0.9, 0.99)}]}}
    return MappingPlan(tuple(entries)), list(source_order), list(target_order), envelope


@settings(max_examples=60, deadline=None)
@given(plans_with_state())
def test_moments_follow_the_weights_and_come_back_exactly(case):
    plan, source_order, target_order, envelope = case
    there, report = convert_training_state(envelope, plan, source_param_order=source_order,
                                           target_param_order=target_order)
    assert report.ok, report.message()
    state = envelope["optimizer"]["state"]
    for key in ("exp_avg", "exp_avg_sq"):  # each moment is converted exactly as a weight would be
        expected = apply_plan(plan, {name: state[i][key] for i, name in enumerate(source_order)})
        for index, target in enumerate(target_order):
            assert torch.equal(there["optimizer"]["state"][index][key], expected[target])
    back, report = convert_training_state(there, plan.inverse(), source_param_order=target_order,
                                          target_param_order=source_order)
    assert report.ok, report.message()
    restored = back["optimizer"]
    assert restored["param_groups"] == envelope["optimizer"]["param_groups"]
    assert restored["state"].keys() == state.keys()
    for index, values in state.items():
        assert all(torch.equal(restored["state"][index][k], v) for k, v in values.items())
