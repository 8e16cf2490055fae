"""The ``weight-mapper`` command line (also ``python -m weight_mapper``).

The verbs follow the pipeline: ``inspect`` a checkpoint, ``map`` it onto a target (writes a
plan), ``apply`` the plan (writes the converted checkpoint). ``demo`` runs the whole pipeline
on a built-in example. Exit codes: 0 on success, 1 on a :class:`WeightMapperError` (its
message goes to stderr), 2 on a usage error. ``--json`` prints machine-readable output on
stdout and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import inspect
import json
import os
import shlex
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text
from rich.tree import Tree
from torch import nn

from weight_mapper.checkpoint import load_checkpoint, refuse_overwrite, temporary_path_for, write_text_atomic
from weight_mapper.convert import ConversionResult, convert_checkpoint
from weight_mapper.errors import CheckpointError, ConversionError, MappingError, PlanError, WeightMapperError
from weight_mapper.mapper import STRATEGIES, WeightMapper
from weight_mapper.matching import MatchOptions
from weight_mapper.plan import MappingPlan
from weight_mapper.renamer import WeightRenamer
from weight_mapper.report import report_dict
from weight_mapper.rules import rule_forms
from weight_mapper.score import DEFAULT_WEIGHTS
from weight_mapper.summary import summarize_checkpoint
from weight_mapper.table import TensorTable
from weight_mapper.tree import ROOT
from weight_mapper.views import HierarchyView, ScoreBreakdownView

__all__ = ["main", "build_parser"]

_PROG = "weight-mapper"
_FACTORY_FORM = "'package.module:callable'"
_FACTORY_HELP = (f"a model factory {_FACTORY_FORM}: a function or class, importable from the current folder "
                 "or PYTHONPATH, that builds the model with no arguments")
# Show a progress bar while converting from this many tensors on (or from several shards).
_PROGRESS_MIN_TENSORS = 300
# inspect's module tree lists at most this many children per module, then sums up the rest.
_TREE_MAX_CHILDREN = 12
_COUNT_SUFFIXES = ("", "K", "M", "B", "T")
_BYTE_SUFFIXES = (" B", " kB", " MB", " GB", " TB")


# ------------------------------------------------------------------------------------ inspect


def _cmd_inspect(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint, key=args.key, trust_pickle=args.trust_pickle)
    summary = summarize_checkpoint(ckpt, path=args.checkpoint, depth=args.depth).to_dict()
    if args.json:
        _print_json(summary)
    else:
        Console().print(_inspect_renderable(summary, ckpt.envelope, depth=args.depth))
    return 0


def _inspect_renderable(summary: Mapping[str, Any], envelope: Mapping, *, depth: int) -> Group:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    n_tensors = f"{summary['n_tensors']:,}"
    if summary["n_tied"]:
        n_tensors += f" ({summary['n_tied']} tied to another name)"
    facts.add_row("format", summary["format"])
    facts.add_row("tensors", n_tensors)
    n_parameters = f"{summary['n_parameters']:,}"
    if summary["n_parameters"] >= 1000:
        n_parameters += f" ({_human(summary['n_parameters'])})"
    facts.add_row("parameters", f"{n_parameters}, {_human(summary['n_bytes'], suffixes=_BYTE_SUFFIXES)}")
    facts.add_row("dtypes", ", ".join(f"{dtype} x{n}" for dtype, n in summary["dtypes"].items()))
    if summary["n_shards"] > 1:
        facts.add_row("shards", str(summary["n_shards"]))
    facts.add_row("state key", Text(repr(summary["state_key"]) if summary["state_key"] else "none (bare state dict)"))
    if envelope:
        facts.add_row("envelope", Text(", ".join(f"{k}={_preview(v)}" for k, v in envelope.items())))
    if summary["wrapper_prefix"]:
        facts.add_row("wrapper prefix",
                      Text(f"{summary['wrapper_prefix']!r} (map ignores it when the target lacks it)"))
    if summary["skipped"]:
        facts.add_row("skipped", Text(f"{len(summary['skipped'])} non-tensor entries: "
                                      + ", ".join(summary["skipped"][:5])))
    training = summary["training_state"]
    for optimizer in training["optimizers"]:
        facts.add_row("optimizer", Text(
            f"{optimizer['location']}: {optimizer['kind']}, {optimizer['n_params']} parameters in "
            f"{optimizer['n_groups']} group(s), {optimizer['n_states']} with state"
            + (f" ({', '.join(optimizer['state_keys'])})" if optimizer["state_keys"] else "")))
    if training["schedulers"]:
        facts.add_row("LR schedulers", Text(f"{training['n_schedulers']} in {', '.join(training['schedulers'])}"))
    if summary["metadata"]:
        facts.add_row("metadata", Text(", ".join(f"{k}={v}" for k, v in summary["metadata"].items())))
    title = Text(summary["path"], style="bold")
    root = Tree(Text.assemble((Path(summary["path"]).name, "bold"), "  ",
                              _counts(summary["n_tensors"], summary["n_parameters"])))
    _fill_tree(root, summary["modules"])
    return Group(Panel(facts, title=title, expand=False), Text(f"Modules (depth {depth})", style="bold"), root)


def _fill_tree(root: Tree, rows: Sequence[Mapping[str, Any]]) -> None:
    """Hang the preorder ``rows`` under ``root``; past the cap, sum a parent's other children up."""
    path2node: dict[str, Tree] = {ROOT: root}
    parent2n_shown: Counter[str] = Counter()
    parent2hidden: dict[str, list[int]] = {}  # parent -> [modules, tensors, parameters] not shown
    for row in rows:
        parent = row["path"].rpartition(".")[0]
        if parent not in path2node:
            continue  # under a child that was not shown
        if parent2n_shown[parent] >= _TREE_MAX_CHILDREN:
            hidden = parent2hidden.setdefault(parent, [0, 0, 0])
            hidden[0] += 1
            hidden[1] += row["n_tensors"]
            hidden[2] += row["n_parameters"]
            continue
        parent2n_shown[parent] += 1
        label = Text.assemble(row["path"].rpartition(".")[2], "  ", _counts(row["n_tensors"], row["n_parameters"]))
        path2node[row["path"]] = path2node[parent].add(label)
    for parent, (n_modules, n_tensors, n_parameters) in parent2hidden.items():
        path2node[parent].add(Text.assemble(f"... {n_modules} more modules  ", _counts(n_tensors, n_parameters)),
                              style="dim")


def _counts(n_tensors: int, n_parameters: int) -> Text:
    return Text(f"{n_tensors:,} tensor{'' if n_tensors == 1 else 's'}, {_human(n_parameters)} parameters",
                style="dim")


def _human(n: int, *, suffixes: Sequence[str] = _COUNT_SUFFIXES) -> str:
    """``12345 -> '12.3K'``; with ``suffixes=_BYTE_SUFFIXES``, ``'12.3 kB'``."""
    value = float(n)
    for step, suffix in enumerate(suffixes):
        if abs(value) < 1000 or step == len(suffixes) - 1:
            return f"{int(value)}{suffix}" if step == 0 else f"{value:.1f}{suffix}"
        value /= 1000
    return str(n)


def _preview(value: Any) -> str:
    """A short description of an envelope entry: scalars as they are, containers by size."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37] + "...")
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, Mapping):
        return f"{{{len(value)} key{'' if len(value) == 1 else 's'}}}"
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} items]"
    return f"<{type(value).__name__}>"


# ------------------------------------------------------------------------------------ map


def _cmd_map(args: argparse.Namespace) -> int:
    # Every matching option in one object, checked before any file is read (a bad --weights name fails here).
    options = MatchOptions(strategy=args.strategy, threshold=args.threshold, weights=args.weights)
    source = load_checkpoint(args.source, key=args.key, trust_pickle=args.trust_pickle)
    # As WeightMapper.from_checkpoint does, but the checkpoint is read once and its files are
    # known, so that the plan can never be written over them.
    source_table = TensorTable.from_checkpoint(source, label=Path(args.source).name)
    target, target_files = _load_target(args.target, key=args.target_key, trust_pickle=args.trust_pickle)
    source_model = _build_model(args.source_model) if args.source_model else None
    mapper = WeightMapper(source_table, target, source_model=source_model)
    explain_names = [_source_name(mapper, name, args.source) for name in args.explain]
    if args.html:  # fail before matching, not after the plan was written
        refuse_overwrite(args.html, [(args.output, "the plan"), *source.files, *target_files])
        if not Path(args.html).parent.is_dir():
            raise CheckpointError(f"Cannot save {args.html}: folder {Path(args.html).parent} does not exist; "
                                  "create it first")
    status_console = Console(stderr=True)
    if args.json or not status_console.is_terminal:
        mapper.suggest_mapping(options=options)
    else:  # a status line while matching: a 100,000-tensor model takes seconds
        with status_console.status("matching") as status:
            mapper.suggest_mapping(options=options, progress=lambda message: status.update(f"matching: {message}"))
    plan = mapper.get_plan()
    inputs = [(p, "the source checkpoint") for p in (*source.files, *target_files)]
    # Every output is built under a temporary name and published only once all of them are built.
    with _Outputs() as outputs:
        # The JSON of report.export_report, written with the checkpoints protected.
        output = Path(args.output)
        write_text_atomic(outputs.stage(output, protected=inputs), json.dumps(report_dict(plan), indent=2))
        if args.rules:
            _write_rules(plan, outputs.stage(Path(args.rules), protected=inputs))
        tree = HierarchyView(mapper.source_table, mapper.target_table, plan=plan, show_matches=True)
        breakdowns = [ScoreBreakdownView.from_plan(mapper.explain(name), plan) for name in explain_names]
        html = None
        if args.html:
            # A page to work in: every entry and unmatched tensor, riskiest first, both trees, breakdowns.
            html = Path(args.html)
            mapper.export_review_page(outputs.stage(html, protected=inputs), explain=explain_names,
                                      title=f"weight_mapper review: {plan.source_label} -> {plan.target_label}")
        outputs.publish()
    if args.json:
        _print_json({"plan": str(output), **report_dict(plan)["summary"]})
        return 0
    console = Console()
    mapper.print_analysis(top_n=args.top, console=console)
    for view in ([tree] if args.tree else []) + breakdowns:
        console.print()
        console.print(view)
    next_step = (f"{_PROG} apply {shlex.quote(args.source)} {shlex.quote(str(output))} -o converted.safetensors"
                 + (f" --validate {shlex.quote(args.target)}" if isinstance(target, nn.Module) else ""))
    if html is not None:
        console.print(Text.assemble(("Review written to ", "green"), (str(html), "bold green"),
                                    " (one HTML page: every entry, riskiest first, to sort, filter and search; "
                                    "both module trees; score breakdowns on a click)"))
    console.print(Text.assemble(("Plan written to ", "green"), (str(output), "bold green"),
                                f" ({len(plan.entries)} entries). Next:"))
    console.print(Text(f"  {next_step}"), soft_wrap=True)  # unwrapped, so that it can be copied
    return 0


def _write_rules(plan: MappingPlan, path: Path) -> Path:
    """--rules: the plan's renames as regex rules, in the forms transformers, mmengine and torchtune take."""
    forms = rule_forms(plan)
    for form, why in forms.refused.items():
        print(f"warning: --rules: {form} not written: {why}", file=sys.stderr)
    return write_text_atomic(path, json.dumps(forms.to_dict(), indent=2))


def _source_name(mapper: WeightMapper, name: str, source: str) -> str:
    """The checkpoint key of SOURCE tensor ``name`` (given with or without the wrapper prefix), for ``--explain``.

    Raises:
        MappingError: naming the close matches among SOURCE's tensors.
    """
    table, prefix = mapper.source_table, mapper.source_prefix  # the table's names are without the prefix
    if prefix and name.startswith(prefix) and name[len(prefix):] in table.name2row:
        return name
    if name in table.name2row:
        return prefix + name
    close = difflib.get_close_matches(name, [prefix + n for n in table.names], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else \
        f"run `{_PROG} inspect {shlex.quote(source)}` to list them"
    raise MappingError(f"--explain {name!r}: {source} has no tensor of that name; {hint}")


def _load_target(spec: str, *, key: str | None, trust_pickle: bool) -> tuple[nn.Module | TensorTable, tuple[Path, ...]]:
    """The target of ``map``: a checkpoint's table (and its files), or a model built by a factory."""
    path = Path(spec)
    if path.exists():
        ckpt = load_checkpoint(path, key=key, trust_pickle=trust_pickle)
        return TensorTable.from_checkpoint(ckpt, label=path.name), ckpt.files
    if ":" in spec:
        return _build_model(spec), ()
    raise MappingError(f"TARGET {spec!r} is neither an existing checkpoint nor a model factory; pass a "
                       f"checkpoint path (file, *.index.json or folder of shards) or {_FACTORY_HELP}")


def _build_model(spec: str, *, meta: bool = True) -> nn.Module:
    """Import ``package.module:callable`` and build its model, on the meta device by default
    (no weights in RAM); ``meta=False`` builds it on the CPU, to run it.

    Raises:
        MappingError: naming ``spec`` and the expected form, whatever step failed.
    """
    factory = _load_factory(spec)
    _require_no_arguments(factory, spec)
    model = None
    if meta:
        try:
            with torch.device("meta"):
                model = factory()
        except Exception as meta_error:  # noqa: BLE001 - some models cannot be built without data; try the CPU
            warnings.warn(f"{spec} could not be built on the meta device ({type(meta_error).__name__}: "
                          f"{meta_error}); building it on the CPU instead, which allocates its weights", stacklevel=2)
    if model is None:
        try:
            model = factory()
        except Exception as e:  # noqa: BLE001 - user code
            raise _factory_error(spec, f"raised {type(e).__name__}: {e} when called with no arguments") from None
    if not isinstance(model, nn.Module):
        raise _factory_error(spec, f"returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _require_no_arguments(factory: Any, spec: str, what: str = "model factory") -> None:
    """Refuse, before any call, a factory that cannot be called without arguments."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins and C extensions: nothing to check up front
        return
    try:
        signature.bind()
    except TypeError:
        needed = [p.name for p in signature.parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        raise _factory_error(spec, f"needs arguments ({', '.join(needed)}) but is called with none; write a "
                                   "function without arguments that builds it, e.g. "
                                   "`def new_model(): return NewModel(num_classes=10)`", what) from None


def _importable_from_cwd() -> None:
    """Put the current folder on ``sys.path``, as ``python -m`` does and the console script does not:
    factories and the classes of a trusted pickle are found there alike."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _load_factory(spec: str, what: str = "model factory") -> Any:
    """Import ``package.module:callable`` and return the callable.

    Raises:
        MappingError: naming ``spec`` and the expected form, whatever step failed.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise _factory_error(spec, "is not of the form package.module:callable", what)
    _importable_from_cwd()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise _factory_error(spec, f"names module {module_name!r}, which cannot be imported "
                                       f"(no module named {e.name!r})", what) from None
        raise _factory_error(spec, f"cannot be imported: importing {module_name!r} failed ({e})", what) from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise _factory_error(spec, f"cannot be imported: importing {module_name!r} raised "
                                   f"{type(e).__name__}: {e}", what) from None
    factory: Any = module
    for attr in attr_path.split("."):
        if not hasattr(factory, attr):
            raise _factory_error(spec, f"names {attr_path!r}, but module {module_name!r} has no "
                                       f"attribute {attr_path!r}", what)
        factory = getattr(factory, attr)
    if not callable(factory):
        raise _factory_error(spec, f"names {attr_path!r}, which is not callable (a {type(factory).__name__})", what)
    return factory


def _factory_error(spec: str, why: str, what: str = "model factory") -> MappingError:
    return MappingError(f"{what} {spec!r} {why}; expected {_FACTORY_HELP}")


# ------------------------------------------------------------------------------------ apply


def _cmd_apply(args: argparse.Namespace) -> int:
    plan_path = Path(args.plan)
    plan = _read_plan(plan_path)
    renamer = WeightRenamer(args.source, key=args.key, trust_pickle=args.trust_pickle)
    refuse_overwrite(args.output, [*renamer.source_files, (plan_path, "the plan")])
    model = _build_model(args.validate) if args.validate else None  # a bad factory fails before any read
    source_model = _build_model(args.source_model) if args.source_model else None
    verify = _verifier(args)
    console = Console()
    with _progress_bar(_progress_console(args, renamer, console)) as progress:
        try:
            result = convert_checkpoint(
                renamer, plan, args.output, plan_path=plan_path, target_model=model, source_model=source_model,
                strict=args.strict, weights_only=args.weights_only, verify=verify, progress=progress)
        except ConversionError as e:
            if e.option == "strict":  # the converted tensors do not fit --validate's model
                raise ConversionError(f"{e} (--strict).") from None
            raise
    failed = args.strict and not result.verified  # --strict and the proof failed: exit 1
    if args.json:
        _print_json(result.to_dict())
    elif result.output is None:  # ... and nothing was written
        console.print(Text(result.verification.message(), style="red"))  # type: ignore[union-attr]
        raise ConversionError(f"the conversion was not verified; nothing was written to {args.output} (--strict)")
    else:
        _print_conversion(console, result, plan, model_name=type(model).__name__)
    return 1 if failed else 0


def _progress_console(args: argparse.Namespace, renamer: WeightRenamer, console: Console) -> Console | None:
    """The console to show apply's progress bar on: a terminal, no --json, and a big or sharded source."""
    big = len(renamer.tensors) >= _PROGRESS_MIN_TENSORS or renamer.n_shards > 1
    return console if big and console.is_terminal and not args.json else None


def _verifier(args: argparse.Namespace) -> Callable[[WeightRenamer, MappingPlan], Any] | None:
    """--verify's proof, run by the conversion before anything is written; a bad factory or input fails now."""
    if not args.verify:
        return None
    _require_no_arguments(_load_factory(args.verify), args.verify)
    _require_no_arguments(_load_factory(args.input, "--input factory"), args.input, "--input factory")
    return lambda renamer, plan: _verify(args, renamer, plan)


def _print_conversion(console: Console, result: ConversionResult, plan: MappingPlan, *, model_name: str) -> None:
    if result.validation is not None:
        console.print(Text(result.validation.message(model_name), style="green" if result.validation.ok else "yellow"))
    if plan.unmatched_source:
        console.print(Text(f"{len(plan.unmatched_source)} source tensors are not in the plan and were left out",
                           style="yellow"))
    if plan.unmatched_target:
        console.print(Text(f"{len(plan.unmatched_target)} target tensors are not filled by the plan",
                           style="yellow"))
    if result.training_state is not None and result.training_state.ok:  # a refusal was a warning on stderr already
        console.print(Text("Optimizer state: " + result.training_state.message(), style="green"))
    console.print(Text.assemble(("Converted ", "green"), f"{result.n_tensors} tensors: ",
                                result.source, " -> ", (str(result.output), "bold green"), f" ({result.format})"))
    if result.verification is not None:
        console.print(Text(result.verification.message(), style="green" if result.verification.ok else "red"))


def _verify(args: argparse.Namespace, renamer: WeightRenamer, plan: MappingPlan):
    """--verify: build both models on the CPU, then prove the conversion on --input."""
    from weight_mapper.verify import verify_checkpoint

    source = _build_model(args.verify, meta=False)
    target = _build_model(args.validate, meta=False)
    dummy_input = _call_input(args.input)
    try:
        return verify_checkpoint(plan, renamer.tensors, source, target, dummy_input, label=args.source)
    except ConversionError as e:
        if e.option == "source_model":
            raise ConversionError(f"--verify {args.verify}: {e}; pass the factory of the model {args.source} was "
                                  "saved from") from None
        raise ConversionError(str(e).replace("dummy_input", f"--input {args.input}()")) from None


def _call_input(spec: str) -> Any:
    """The input --verify runs the models on: ``INPUT()``, errors naming --input."""
    factory = _load_factory(spec, "--input factory")
    _require_no_arguments(factory, spec, "--input factory")
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 - user code
        raise MappingError(f"--input {spec!r} raised {type(e).__name__}: {e} when called with no arguments; "
                           "it must return the models' input (a tensor, a tuple or a dict)") from None


def _read_plan(path: Path) -> MappingPlan:
    try:
        return MappingPlan.from_json(path)
    except PlanError as e:  # some of its messages do not say which file they are about
        if str(path) in str(e):
            raise
        raise PlanError(f"Plan {path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"Plan {path} could not be read ({type(e).__name__}: {e}); pass the JSON file that "
                        f"`{_PROG} map` wrote") from None


class _Outputs:
    """A command's output files, built under temporary names and published together at the end.

    ``stage(path)`` checks ``path`` (not an input, its folder exists) and returns the temporary
    name to build it at; ``publish()`` renames every staged file onto its path. Leaving the
    ``with`` block without publishing (an error, Ctrl-C) removes whatever was staged.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []

    def stage(self, path: Path, *, protected: Iterable[tuple[Path, str]] = ()) -> Path:
        refuse_overwrite(path, [*protected, *((final, "another output") for _, final in self._staged)])
        if not path.parent.is_dir():
            raise CheckpointError(f"Cannot save {path}: folder {path.parent} does not exist; create it first")
        if path.is_dir():
            raise CheckpointError(f"Cannot save to {path}: it is a folder; pass a file path")
        tmp = temporary_path_for(path)
        self._staged.append((tmp, path))
        return tmp

    def publish(self) -> None:
        for tmp, path in self._staged:
            os.replace(tmp, path)
        self._staged = []

    def __enter__(self) -> _Outputs:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def _progress_bar(console: Console | None) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar over the source tensors read while saving: yields ``progress(done, total)``; None without ``console``."""
    if console is None:
        yield None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("Converting", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# ------------------------------------------------------------------------------------ demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from weight_mapper.demo import run_demo

    return 0 if run_demo(args.workdir, console=Console()) else 1


# ------------------------------------------------------------------------------------ parser


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _parse_weights(text: str) -> dict[str, float]:
    """``'shape=0.5,name=0.3'`` -> ``{'shape': 0.5, 'name': 0.3}``; the names are checked later."""
    name2weight: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            name2weight[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT pairs such as {_DEFAULT_WEIGHTS}; "
                                             f"got {part!r}") from None
    return name2weight


#: The default weights as --weights takes them (from the score component registry).
_DEFAULT_WEIGHTS = ",".join(f"{name}={weight:g}" for name, weight in DEFAULT_WEIGHTS.items())


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _check_map(args: argparse.Namespace) -> None:
    if args.json and (args.tree or args.explain):
        args.parser.error("--tree and --explain print tables, --json prints only JSON; "
                          "drop --json, or save the views with --html REPORT")


def _check_apply(args: argparse.Namespace) -> None:
    if args.strict and not args.validate:
        args.parser.error("--strict needs --validate TARGET: it fails when validation against TARGET fails")
    if args.verify and not (args.validate and args.input):
        args.parser.error("--verify SOURCE_MODEL needs --validate TARGET (the target model) and --input INPUT "
                          "(what to run both models on)")
    if args.weights_only and args.source_model:
        args.parser.error("--source-model only serves to convert the optimizer state, which --weights-only leaves out")


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs of descriptions and epilogs; keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            paragraph if any(line.startswith(" ") for line in paragraph.splitlines())
            else super(_HelpFormatter, self)._fill_text(paragraph, width, indent)
            for paragraph in text.split("\n\n")
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    from weight_mapper import __version__

    parser = argparse.ArgumentParser(
        prog=_PROG, formatter_class=_HelpFormatter,
        description="Infer how the tensors of one PyTorch checkpoint map onto another architecture, and convert it.",
        epilog=f"""workflow (look, infer, convert):
  {_PROG} inspect old.ckpt
  {_PROG} map old.ckpt mypkg.models:new_model -o plan.json
  {_PROG} apply old.ckpt plan.json -o new.safetensors --validate mypkg.models:new_model --strict

Exit codes: 0 success, 1 error (message on stderr), 2 usage error. Run '{_PROG} COMMAND --help' \
for a command's options and examples.""",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--key", metavar="K", default=None,
                         help="envelope key holding the source weights, when several hold tensors "
                              "(e.g. state_dict, model, ema)")
    reading.add_argument("--trust-pickle", action="store_true",
                         help="allow torch pickles that need arbitrary code to load; "
                              "ONLY for files from a trusted source")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout instead of tables")

    inspect = sub.add_parser(
        "inspect", parents=[reading, output], formatter_class=_HelpFormatter,
        help="show what a checkpoint holds: format, tensors, parameters, dtypes, envelope, modules",
        description="Show what a checkpoint holds without reading tensor data from safetensors files: format, "
                    "tensor and parameter counts, dtypes, the envelope around the state dict (epoch, "
                    "hyper_parameters, ...), a wrapper prefix (module., _orig_mod., model.), shards, "
                    "and the module tree.",
        epilog=f"""examples:
  {_PROG} inspect lightning.ckpt
  {_PROG} inspect model.safetensors --depth 3
  {_PROG} inspect llama/ --json | jq .n_parameters""",
    )
    inspect.add_argument("checkpoint", metavar="CKPT",
                         help="a .pt/.pth/.bin/.ckpt/.safetensors file, a *.index.json or a folder of shards")
    inspect.add_argument("--depth", type=_non_negative_int, default=2, metavar="N",
                         help="levels of the module tree to show (default: %(default)s)")
    inspect.set_defaults(func=_cmd_inspect)

    mapping = sub.add_parser(
        "map", parents=[reading, output], formatter_class=_HelpFormatter,
        help="infer how SOURCE's tensors map onto TARGET and write the plan (JSON)",
        description="Infer from names, shapes and module structure where every tensor of SOURCE goes in TARGET; "
                    "print the analysis and write the plan, which 'apply' executes. No tensor data is read: "
                    "a factory's model is built on the meta device.",
        epilog=f"""examples:
  {_PROG} map old.ckpt mypkg.models:new_model -o plan.json
  {_PROG} map old.pth new_layout.safetensors -o plan.json --strategy conservative
  {_PROG} map old.pth mypkg.models:NewNet -o plan.json --weights shape=0.6,name=0.4 --json
  {_PROG} map old.ckpt mypkg.models:new_model -o plan.json --tree --explain backbone.0.weight --html review.html
  {_PROG} map regnet.pth timm_factory:regnety_004 -o plan.json --source-model torchvision.models:regnet_y_400mf""",
    )
    mapping.add_argument("source", metavar="SOURCE",
                         help="the checkpoint holding the weights (any format inspect reads)")
    mapping.add_argument("target", metavar="TARGET",
                         help=f"a checkpoint of the target architecture, or {_FACTORY_HELP}")
    mapping.add_argument("-o", "--output", required=True, metavar="PLAN",
                         help="where to write the plan (JSON: the report plus everything apply needs)")
    mapping.add_argument("--strategy", choices=sorted(STRATEGIES), default="best_match",
                         help="best_match: optimal assignment; conservative: withhold ambiguous matches, "
                              "threshold >= 0.75; shape_only: positional baseline; greedy: highest score "
                              "first (default: %(default)s)")
    mapping.add_argument("--threshold", type=_unit_interval, default=0.6, metavar="T",
                         help="minimum score of a match, in [0, 1] (default: %(default)s)")
    mapping.add_argument("--weights", type=_parse_weights, default=None, metavar="W",
                         help=f"score component weights, e.g. {_DEFAULT_WEIGHTS} (the default)")
    mapping.add_argument("--top", type=_non_negative_int, default=10, metavar="N",
                         help="matches (lowest scores first) and unmatched tensors to list (default: %(default)s)")
    mapping.add_argument("--source-model", metavar="FACTORY", default=None,
                         help="the architecture SOURCE was saved from, as package.module:callable (built "
                              "on the meta device): adds its module types, definition order and data flow "
                              "to the checkpoint's names and shapes")
    mapping.add_argument("--target-key", metavar="K", default=None,
                         help="like --key, for a TARGET checkpoint")
    mapping.add_argument("--tree", action="store_true",
                         help="also print both module trees side by side, matched modules marked")
    mapping.add_argument("--explain", action="append", default=[], metavar="NAME",
                         help="also print why SOURCE tensor NAME went where it did: every score, its weight, "
                              "and the alternatives (repeatable)")
    mapping.add_argument("--html", metavar="REPORT", default=None,
                         help="also save the review as one self-contained HTML page: every entry, riskiest "
                              "first, to sort, filter and search; both module trees; score breakdowns "
                              "(the riskiest entries' and the --explain ones) on a click")
    mapping.add_argument("--rules", metavar="RULES", default=None,
                         help="also save the renames as a short list of regex rules (JSON: the rules, transformers' "
                              "key_mapping, mmengine's revise_keys, and the entries that are not plain renames)")
    mapping.set_defaults(func=_cmd_map, check=_check_map, parser=mapping)

    apply = sub.add_parser(
        "apply", parents=[reading, output], formatter_class=_HelpFormatter,
        help="convert SOURCE with a plan from 'map' and save it (safetensors or torch, by extension)",
        description="Rename SOURCE's tensors as the plan says (and transpose, reshape, concatenate, stack or "
                    "stack-and-concatenate them where it says so), and save "
                    "them atomically to OUT: safetensors for *.safetensors, a folder of safetensors shards for a "
                    "path without suffix, a torch file otherwise (which keeps the envelope, e.g. Lightning's "
                    "epoch, and converts its optimizer state with the same plan: moments re-keyed to TARGET's "
                    "parameter order and transformed as the weights; LR schedulers pass through; state whose "
                    "parameter order is not certain is left out with a warning). SOURCE is never overwritten.",
        epilog=f"""examples:
  {_PROG} apply old.ckpt plan.json -o new.safetensors
  {_PROG} apply old.ckpt plan.json -o new.ckpt --validate mypkg.models:new_model --strict
  {_PROG} apply llama/ plan.json -o converted/        (sharded in, sharded out)
  {_PROG} apply last.ckpt plan.json -o resumable.ckpt --validate mypkg.models:new_model   (optimizer state too)
  {_PROG} apply last.ckpt plan.json -o weights.ckpt --weights-only
  {_PROG} apply old.pt plan.json -o new.pt --validate pkg.models:new_model \\
      --verify pkg.models:old_model --input pkg.models:sample_batch --strict""",
    )
    apply.add_argument("source", metavar="SOURCE", help="the checkpoint the plan was made for")
    apply.add_argument("plan", metavar="PLAN", help="the plan written by 'map'")
    apply.add_argument("-o", "--output", required=True, metavar="OUT",
                       help="the converted checkpoint: *.safetensors, a torch file (*.pt/*.pth/*.ckpt/*.bin), "
                            "or a new folder (no suffix) for sharded safetensors, one shard per source shard")
    apply.add_argument("--validate", metavar="TARGET", default=None,
                       help=f"check the converted keys and shapes against {_FACTORY_HELP} "
                            "(built on the meta device), in load_state_dict's words")
    apply.add_argument("--strict", action="store_true",
                       help="with --validate: fail (exit 1, nothing written) unless every key and shape fits")
    apply.add_argument("--verify", metavar="SOURCE_MODEL", default=None,
                       help=f"prove the conversion: build the source model ({_FACTORY_HELP}) and the --validate "
                            "model on the CPU, load SOURCE into the first and the converted weights into the "
                            "second, run both on --input and report the max abs output difference")
    apply.add_argument("--weights-only", action="store_true",
                       help="leave the training state (optimizer, LR scheduler, AMP scaler) out of a torch OUT; "
                            "by default optimizer state follows the plan (needs --validate TARGET for the target's "
                            "parameter order) and LR schedulers pass through")
    apply.add_argument("--source-model", metavar="FACTORY", default=None,
                       help="the architecture SOURCE was saved from, as package.module:callable (built on the meta "
                            "device): its parameters() order says which optimizer state belongs to which tensor; "
                            "without it the order is read from SOURCE, without its buffers")
    apply.add_argument("--input", metavar="INPUT", default=None,
                       help="with --verify: package.module:callable returning the input (a tensor, a tuple of "
                            "arguments or a dict of keyword arguments)")
    apply.set_defaults(func=_cmd_apply, check=_check_apply, parser=apply)

    demo = sub.add_parser(
        "demo", formatter_class=_HelpFormatter,
        help="run the built-in example: map an old CNN's checkpoint onto its refactored version",
        description="Save an old CNN's checkpoint, map it onto a refactored CNN, convert it to safetensors, "
                    "load it and check that both models compute the same.",
        epilog=f"example:\n  {_PROG} demo --workdir demo_files",
    )
    demo.add_argument("--workdir", default=None, help="keep the example's checkpoint files in this folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    print(f"{_PROG}: warning: {message}", file=sys.stderr)


# The library's errors name the keyword argument that fixes them; the CLI names its flag, here only.
_OPTION2FLAG = {"trust_pickle": "--trust-pickle", "key": "--key"}


def _flag_hint(exc: WeightMapperError) -> str:
    """`` (CLI: --flag VALUE)`` for an error that a flag fixes, else ""."""
    flag = _OPTION2FLAG.get(exc.option or "")
    if flag is None:
        return ""
    value = "" if exc.option == "trust_pickle" else f" {exc.value or 'NAME'}"
    return f" (CLI: {flag}{value})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code (0 success, 1 error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "check", None):
            args.check(args)
    except SystemExit as exc:  # argparse exits after --help/--version (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    for stream in (sys.stdout, sys.stderr):  # a name that cannot be encoded is printed escaped, never a crash
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    if getattr(args, "trust_pickle", False):
        _importable_from_cwd()  # a trusted pickle's classes are found where factories are
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line on stderr, not Python's file:line form
        try:
            return int(args.func(args))
        except WeightMapperError as exc:
            print(f"{_PROG}: error: {exc}{_flag_hint(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{_PROG}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `... --json | head`: the reader left; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # 128 + SIGPIPE, as for other Unix tools


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
