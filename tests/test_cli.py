"""The ``weight-mapper`` command line, end to end through ``main(argv)``, in this process.

Output, exit codes and files are what a user sees. One subprocess smoke test per verb
(``python -m weight_mapper VERB``) checks the real entry point: imports, exit code, streams;
a subprocess imports torch (about two seconds), so everything else runs in-process.
"""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_factories import OLD2NEW, NewNet, OldNet
from weight_mapper import MappingPlan, save_checkpoint
from weight_mapper import cli
from weight_mapper.cli import main

_TESTS = Path(__file__).parent
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(_TESTS), os.environ.get("PYTHONPATH")) if p)}
_N_PARAMETERS = sum(t.numel() for t in OldNet().state_dict().values())
_FACTORY = "cli_factories:new_net"


def _subprocess(*args) -> subprocess.CompletedProcess:
    """``python -m weight_mapper ARGS``: the smoke test of a verb."""
    return subprocess.run([sys.executable, "-m", "weight_mapper", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=_ENV)


def _run(*args) -> subprocess.CompletedProcess:
    """``main(ARGS)`` in this process, its exit code and output captured as a subprocess's would be."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(list(args), code, stdout.getvalue(), stderr.getvalue())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outputs(state_dict, x) -> torch.Tensor:
    model = NewNet().eval()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An OldNet trained a little (BatchNorm has statistics), saved in every way the tests read."""
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    old = OldNet()
    with torch.no_grad():
        old.train()(torch.randn(8, 3, 8, 8))
    old.eval()
    state_dict = old.state_dict()
    paths = {name: folder / name for name in
             ("lightning.ckpt", "plain.pt", "old.safetensors", "new_layout.safetensors", "evil.pt")}
    torch.save({  # what Lightning writes when the LightningModule keeps the network in `self.model`
        "state_dict": {f"model.{k}": v for k, v in state_dict.items()},
        "epoch": 3,
        "global_step": 30,
        "hyper_parameters": {"lr": 0.1, "width": 8},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "pytorch-lightning_version": "2.4.0",
    }, paths["lightning.ckpt"])
    torch.save(state_dict, paths["plain.pt"])
    save_file(dict(state_dict), paths["old.safetensors"])
    save_file(NewNet().state_dict(), paths["new_layout.safetensors"])
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Evil(folder / "PWNED")}, paths["evil.pt"])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = old(x)
    sha = {name: _sha256(path) for name, path in paths.items()}
    return {"folder": folder, **paths, "x": x, "expected": expected, "sha": sha}


class _Evil:
    """Unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _assert_unchanged(files, *names):
    for name in names:
        assert _sha256(files[name]) == files["sha"][name], f"{name} was modified"


@pytest.fixture(scope="module")
def lightning_plan(files):
    """``map`` from the Lightning checkpoint onto a model factory, with the rich analysis."""
    plan = files["folder"] / "plan.json"
    return plan, _subprocess("map", files["lightning.ckpt"], _FACTORY, "-o", plan)  # map's smoke test


@pytest.fixture(scope="module")
def checkpoint_plan(files):
    """``map`` from a bare .pt onto a checkpoint of the target layout, as JSON."""
    plan = files["folder"] / "plan_from_checkpoint.json"
    return plan, _run("map", files["plain.pt"], files["new_layout.safetensors"], "-o", plan, "--json")


# ------------------------------------------------------------------------------------ demo / help


def test_demo_runs_end_to_end_in_a_subprocess(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "weight_mapper", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "converted model computes what the old one did" in out.stdout
    assert (tmp_path / "new_model.safetensors").is_file()


def test_no_command_prints_help_and_fails():
    out = _run()
    assert out.returncode == 2
    assert "demo" in out.stdout


def test_every_verb_has_a_one_line_help_and_an_example(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for verb in ("inspect", "map", "apply", "demo"):
        assert f"    {verb} " in text
        assert main([verb, "--help"]) == 0
        assert f"weight-mapper {verb}" in capsys.readouterr().out.split("example")[-1]


# ------------------------------------------------------------------------------------ inspect


def test_inspect_lightning_checkpoint(files):
    out = _subprocess("inspect", files["lightning.ckpt"])  # inspect's smoke test
    assert out.returncode == 0, out.stderr
    for expected in ("torch", "'state_dict'", "epoch=3", "hyper_parameters={2 keys}", "'model.'",
                     f"{_N_PARAMETERS:,}", "float32 x11, int64 x1", "backbone", "classifier"):
        assert expected in out.stdout
    assert "\x1b[" not in out.stdout  # not a terminal: no colour codes


def test_inspect_lightning_checkpoint_as_json(files):
    out = _run("inspect", files["lightning.ckpt"], "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["format"] == "torch" and data["state_key"] == "state_dict"
    assert data["envelope_keys"] == ["epoch", "global_step", "hyper_parameters", "optimizer_states",
                                     "pytorch-lightning_version"]
    assert data["wrapper_prefix"] == "model."
    assert (data["n_tensors"], data["n_tied"], data["n_shards"]) == (12, 0, 1)
    assert data["n_parameters"] == _N_PARAMETERS
    assert data["dtypes"] == {"float32": 11, "int64": 1}
    # The depth counts below the wrapper prefix, and counts add up at every level.
    rows = {row["path"]: row for row in data["modules"]}
    assert list(rows) == ["model", "model.backbone", "model.backbone.0", "model.backbone.1", "model.backbone.3",
                          "model.classifier", "model.classifier.0", "model.classifier.2"]
    assert rows["model"]["n_parameters"] == _N_PARAMETERS
    assert rows["model.backbone"]["n_tensors"] == 8 and rows["model.backbone.1"]["n_tensors"] == 5
    assert rows["model.backbone"]["n_parameters"] + rows["model.classifier"]["n_parameters"] == _N_PARAMETERS


def test_inspect_safetensors(files):
    out = _run("inspect", files["old.safetensors"], "--depth", "1")
    assert out.returncode == 0, out.stderr
    assert "safetensors" in out.stdout and "none (bare state dict)" in out.stdout
    assert "backbone" in out.stdout and "classifier" in out.stdout and "backbone.0" not in out.stdout


def test_inspect_safetensors_as_json_reads_no_tensor_data(files, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("inspect opened the tensor data")

    monkeypatch.setattr("weight_mapper.checkpoint.safe_open", refuse)
    assert main(["inspect", str(files["old.safetensors"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "safetensors" and data["state_key"] is None and data["envelope_keys"] == []
    assert data["n_parameters"] == _N_PARAMETERS and data["wrapper_prefix"] == ""
    # safetensors stores names by dtype and name; the tree still lists modules in natural order
    assert [row["path"] for row in data["modules"]][:4] == ["backbone", "backbone.0", "backbone.1", "backbone.3"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_inspect_counts_tied_weights_once(tmp_path, capsys, suffix):
    embedding = torch.randn(5, 4)
    path = save_checkpoint({"embed.weight": embedding, "head.weight": embedding, "head.bias": torch.zeros(5)},
                           tmp_path / f"tied{suffix}")
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["n_tensors"], data["n_tied"], data["n_parameters"]) == (3, 1, 25)
    assert {row["path"]: row["n_parameters"] for row in data["modules"]} == {"embed": 20, "head": 5}


# ------------------------------------------------------------------------------------ map


def test_map_lightning_checkpoint_onto_a_factory(files, lightning_plan):
    plan_path, out = lightning_plan
    assert out.returncode == 0, out.stderr
    assert "target tensors filled: 12/12" in out.stdout
    assert "Plan written to" in out.stdout and f"--validate {_FACTORY}" in out.stdout
    plan = MappingPlan.from_json(plan_path)
    assert plan.mapping == {f"model.{k}": v for k, v in OLD2NEW.items()}
    assert plan.source_prefix == "model." and plan.target_label == "NewNet"
    assert json.loads(plan_path.read_text())["summary"]["coverage"] == 1.0  # the report is in the plan
    _assert_unchanged(files, "lightning.ckpt")


def test_map_onto_a_checkpoint_as_json(files, checkpoint_plan):
    plan_path, out = checkpoint_plan
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["plan"] == str(plan_path)
    assert (summary["n_matched"], summary["n_unmatched_source"], summary["coverage"]) == (12, 0, 1.0)
    assert summary["target_model"] == "new_layout.safetensors"
    assert MappingPlan.from_json(plan_path).mapping == OLD2NEW
    _assert_unchanged(files, "plain.pt", "new_layout.safetensors")


@pytest.mark.parametrize(("factory", "why"), [
    ("new_net", "neither an existing checkpoint nor a model factory"),
    (":new_net", "is not of the form"),
    ("no_such_package.models:new_net", "no module named 'no_such_package'"),
    ("cli_factories:missing", "has no attribute 'missing'"),
    ("cli_factories:NOT_CALLABLE", "not callable"),
    ("cli_factories:not_a_model", "returned a dict, not a torch.nn.Module"),
])
def test_map_names_a_bad_factory_and_the_expected_form(files, tmp_path, capsys, factory, why):
    plan = tmp_path / "plan.json"
    assert main(["map", str(files["plain.pt"]), factory, "-o", str(plan)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("weight-mapper: error:") and repr(factory) in err and why in err
    assert "'package.module:callable'" in err
    assert not plan.exists()


def test_map_refuses_to_write_the_plan_over_the_source(files, capsys):
    assert main(["map", str(files["plain.pt"]), _FACTORY, "-o", str(files["plain.pt"])]) == 1
    assert "Refusing to overwrite the source checkpoint" in capsys.readouterr().err
    _assert_unchanged(files, "plain.pt")


@pytest.mark.parametrize("argv", [
    ["map", "a.pt", _FACTORY, "-o", "p.json", "--weights", "shape=lots"],
    ["map", "a.pt", _FACTORY, "-o", "p.json", "--threshold", "1.5"],
    ["map", "a.pt", _FACTORY, "-o", "p.json", "--strategy", "magic"],
    ["map", "a.pt", _FACTORY],
    ["apply", "a.pt", "p.json", "-o", "b.pt", "--strict"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: weight-mapper" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ apply


def test_apply_lightning_plan_to_safetensors_loads_into_the_bare_model(files, lightning_plan):
    out_path = files["folder"] / "converted.safetensors"
    out = _subprocess("apply", files["lightning.ckpt"], lightning_plan[0], "-o", out_path,  # apply's smoke test
                      "--validate", _FACTORY)
    assert out.returncode == 0, out.stderr
    assert "All keys matched successfully for NewNet" in out.stdout
    assert "envelope entries" in out.stderr  # safetensors cannot keep epoch & co; the user is told
    assert torch.equal(_outputs(load_file(out_path), files["x"]), files["expected"])
    _assert_unchanged(files, "lightning.ckpt")


def test_apply_to_a_torch_file_keeps_the_envelope(files, lightning_plan):
    out_path = files["folder"] / "converted.ckpt"
    out = _run("apply", files["lightning.ckpt"], lightning_plan[0], "-o", out_path, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["output"] == str(out_path) and report["format"] == "torch" and report["n_tensors"] == 12
    assert report["validation"] is None
    saved = torch.load(out_path, weights_only=True)
    assert saved["epoch"] == 3 and saved["hyper_parameters"] == {"lr": 0.1, "width": 8}
    assert torch.equal(_outputs(saved["state_dict"], files["x"]), files["expected"])
    _assert_unchanged(files, "lightning.ckpt")


def test_apply_with_a_progress_bar(files, checkpoint_plan, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich treats stdout as a terminal
    monkeypatch.setattr(cli, "_PROGRESS_MIN_TENSORS", 1)
    out_path = tmp_path / "converted.pt"
    assert main(["apply", str(files["plain.pt"]), str(checkpoint_plan[0]), "-o", str(out_path)]) == 0
    assert "Converting" in capsys.readouterr().out
    assert torch.equal(_outputs(torch.load(out_path, weights_only=True), files["x"]), files["expected"])


def test_apply_strict_validation_failure_writes_nothing(files, lightning_plan):
    out_path = files["folder"] / "never.safetensors"
    out = _run("apply", files["lightning.ckpt"], lightning_plan[0], "-o", out_path,
               "--validate", "cli_factories:wider_net", "--strict")
    assert out.returncode == 1
    assert "size mismatch for head.logits.weight" in out.stderr and "Nothing was written" in out.stderr
    assert not out_path.exists()


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(("case", "expected"), [
    ("missing checkpoint", "No such checkpoint"),
    ("malicious pickle", "--trust-pickle"),
    ("bad factory", "has no attribute 'new_model'"),
    ("missing plan", "No such plan file"),
    ("output is the source", "Refusing to overwrite the source checkpoint"),
])
def test_bad_inputs_exit_1_naming_the_file(files, lightning_plan, case, expected):
    folder, plan = files["folder"], lightning_plan[0]
    argv, named = {
        "missing checkpoint": (["inspect", folder / "missing.pt"], folder / "missing.pt"),
        "malicious pickle": (["inspect", files["evil.pt"]], files["evil.pt"]),
        "bad factory": (["map", files["plain.pt"], "cli_factories:new_model", "-o", folder / "bad.json"],
                        "cli_factories:new_model"),
        "missing plan": (["apply", files["plain.pt"], folder / "nope.json", "-o", folder / "x.pt"],
                         folder / "nope.json"),
        "output is the source": (["apply", files["lightning.ckpt"], plan, "-o", files["lightning.ckpt"]],
                                 files["lightning.ckpt"]),
    }[case]
    out = _run(*argv)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("weight-mapper: error:") and str(named) in out.stderr and expected in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (folder / "PWNED").exists()  # the pickle's code never ran
    _assert_unchanged(files, "lightning.ckpt", "plain.pt", "evil.pt")


def test_apply_verify_proves_the_conversion(files, lightning_plan, tmp_path, capsys, monkeypatch):
    from weight_mapper.cli import main

    monkeypatch.syspath_prepend(str(_TESTS))
    out = tmp_path / "verified.safetensors"
    plan, _ = lightning_plan
    code = main(["apply", str(files["lightning.ckpt"]), str(plan), "-o", str(out), "--validate", _FACTORY,
                 "--verify", "cli_factories:old_net", "--input", "cli_factories:example_input", "--strict"])
    assert code == 0
    assert "conversion verified: max abs output difference 0" in capsys.readouterr().out
    assert out.is_file()


def test_apply_verify_needs_a_target_and_an_input(files, lightning_plan, tmp_path, capsys):
    from weight_mapper.cli import main

    code = main(["apply", str(files["lightning.ckpt"]), str(lightning_plan[0]), "-o", str(tmp_path / "x.pt"),
                 "--verify", "cli_factories:old_net"])
    assert code == 2
    assert "--verify SOURCE_MODEL needs --validate TARGET" in capsys.readouterr().err


def test_map_writes_rename_rules(files, tmp_path, monkeypatch):
    from weight_mapper.cli import main
    from weight_mapper.rules import RenameRule, check_rules

    monkeypatch.syspath_prepend(str(_TESTS))
    plan, rules = tmp_path / "plan.json", tmp_path / "rules.json"
    assert main(["map", str(files["lightning.ckpt"]), _FACTORY, "-o", str(plan), "--rules", str(rules), "--json"]) == 0
    data = json.loads(rules.read_text())
    mapping = MappingPlan.from_json(plan).mapping
    parsed = [RenameRule(r["pattern"], r["replacement"]) for r in data["rules"]]
    assert check_rules(parsed, mapping) == [] and len(parsed) < len(mapping)
    assert data["key_mapping"] == {r.pattern: r.replacement for r in parsed}


def test_stacked_experts_map_apply_and_verify_from_the_cli(tmp_path, capsys, monkeypatch):
    from cli_factories import expert_list
    from weight_mapper.cli import main

    monkeypatch.syspath_prepend(str(_TESTS))
    source, plan, out = tmp_path / "experts.pt", tmp_path / "plan.json", tmp_path / "stacked.safetensors"
    torch.save(expert_list().state_dict(), source)
    assert main(["map", str(source), "cli_factories:stacked_experts", "-o", str(plan), "--json"]) == 0
    entries = {e.target: e for e in MappingPlan.from_json(plan).entries}
    assert entries["w1"].transform == "stack" and len(entries["w1"].source) == 4
    capsys.readouterr()
    assert main(["apply", str(source), str(plan), "-o", str(out), "--validate", "cli_factories:stacked_experts",
                 "--verify", "cli_factories:expert_list", "--input", "cli_factories:expert_input",
                 "--strict", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verification"]["ok"] and report["verification"]["max_abs_diff"] < 1e-6


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_map_with_the_source_model_knows_its_data_flow(tmp_path, capsys, suffix):
    """A checkpoint alone cannot tell RegNet's shortcut from its first conv; its model can."""
    from fixture_models import ShortcutFirst
    from test_flow import shortcut_truth

    source = ShortcutFirst()
    ckpt = tmp_path / f"regnet_like{suffix}"
    save_checkpoint({f"module.{k}": v for k, v in source.state_dict().items()}, ckpt)  # a DDP prefix, too
    plan_path = tmp_path / "plan.json"
    argv = ["map", str(ckpt), "cli_factories:shortcut_last", "-o", str(plan_path), "--json"]
    assert main([*argv, "--source-model", "cli_factories:shortcut_first"]) == 0
    assert MappingPlan.from_json(plan_path).mapping == {f"module.{k}": v for k, v in shortcut_truth(source).items()}
    with_model = MappingPlan.from_json(plan_path)
    assert main(argv) == 0
    without = MappingPlan.from_json(plan_path)
    if suffix == ".pt":  # without the model, definition order swaps the shortcut and the first conv
        assert without.mapping["module.trunk.block1.0.proj.0.weight"] == "stages.0.0.conv1.0.weight"
    else:  # a sorted header has no order at all: the ordinals decide (f.a/f.b/f.c ~ conv1..3), proj is left
        assert without.mapping == with_model.mapping
    capsys.readouterr()


def test_map_refuses_a_source_model_that_is_not_the_checkpoints(files, tmp_path, capsys):
    code = main(["map", str(files["plain.pt"]), _FACTORY, "-o", str(tmp_path / "p.json"),
                 "--source-model", "cli_factories:shortcut_first"])
    err = capsys.readouterr().err
    assert code != 0 and "plain.pt is not a state dict of ShortcutFirst: missing: stem.0.weight" in err
    assert "unexpected: backbone.0.weight" in err and not (tmp_path / "p.json").exists()


def test_library_errors_get_the_cli_flag_once_at_the_edge(tmp_path, capsys):
    path = tmp_path / "two.ckpt"
    torch.save({"state_dict": OldNet().state_dict(), "ema": OldNet().state_dict()}, path)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "pass key='state_dict' to choose one (CLI: --key state_dict)" in err and err.count("--key") == 1
    assert main(["inspect", str(path), "--key", "ema", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state_key"] == "ema"
