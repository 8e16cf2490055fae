"""The built-in example behind ``weight-mapper demo``: a refactored CNN gets its old weights.

An "old" model (``backbone`` / ``classifier``, BatchNorm included) is saved as a checkpoint;
a refactored model (``stem`` / ``stages`` / ``head``, layers regrouped and renamed) is
built; the mapping is inferred from the checkpoint's shapes and names, applied, saved as
safetensors, loaded into the new model, and both models are run on the same input.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["OldNet", "NewNet", "run_demo"]


class OldNet(nn.Module):
    """The model as it was trained."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.backbone(x).mean((2, 3)))


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


class NewNet(nn.Module):
    """The refactored model: same computation, new module layout and names."""

    def __init__(self):
        super().__init__()
        self.stem = _ConvBlock(3, 16)
        self.stages = nn.ModuleList([_ConvBlock(16, 32), _ConvBlock(32, 32)])
        self.head = nn.ModuleDict({"hidden": nn.Linear(32, 64), "logits": nn.Linear(64, 10)})

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head["logits"](torch.relu(self.head["hidden"](x.mean((2, 3)))))


def run_demo(workdir: str | Path | None = None, *, console=None) -> bool:
    """Run the example end to end; return True when the converted model matches.

    Args:
        workdir: Folder for the checkpoint files, created if missing (a temporary one by default).

    Raises:
        CheckpointError: If ``workdir`` is a file.
        console: A rich Console to print to.
    """
    from rich.console import Console

    from weight_mapper.checkpoint import load_checkpoint
    from weight_mapper.errors import CheckpointError
    from weight_mapper.matching import MatchOptions, match
    from weight_mapper.renamer import WeightRenamer
    from weight_mapper.report import print_analysis
    from weight_mapper.table import TensorTable

    console = console or Console()
    torch.manual_seed(0)
    old = OldNet()
    with torch.no_grad():  # give BatchNorm real statistics, as a trained model has
        old.train()(torch.randn(16, 3, 12, 12))
    old.eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"--workdir {folder} is a file; name a folder (it is created if missing)")
        folder.mkdir(parents=True, exist_ok=True)
        src = folder / "old_model.pth"
        torch.save(old.state_dict(), src)
        console.print(f"[bold]1.[/] saved the old model's checkpoint to {src}")
        new = NewNet().eval()
        # The library core: two tables (the checkpoint's names and shapes, the new model's) -> a plan.
        source_table = TensorTable.from_checkpoint(load_checkpoint(src), label=src.name)
        plan = match(source_table, TensorTable.from_module(new), options=MatchOptions(strategy="best_match"))
        console.print("[bold]2.[/] inferred the mapping from the checkpoint's names and shapes:")
        print_analysis(plan, top_n=6, console=console)
        renamer = WeightRenamer(src)
        renamer.rename_keys(plan)
        out = renamer.save(folder / "new_model.safetensors")
        report = renamer.validate(new)
        console.print(f"[bold]3.[/] converted and saved {out} ({report.message(type(new).__name__)})")
        from safetensors.torch import load_file

        new.load_state_dict(load_file(out), strict=True)
        x = torch.randn(4, 3, 12, 12)
        with torch.no_grad():
            diff = (old(x) - new(x)).abs().max().item()
        ok = report.ok and diff == 0.0
        style = "green" if ok else "red"
        console.print(f"[bold]4.[/] ran both models on the same input: max abs difference [{style}]{diff:.3g}[/]")
        console.print(f"[{style} bold]{'converted model computes what the old one did' if ok else 'conversion FAILED'}[/]")
        return ok
