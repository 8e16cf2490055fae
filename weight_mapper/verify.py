"""Stage 6b: the proof. Convert, load into the target, run both models side by side, compare.

Both models run once on the same input with forward hooks on the *module pairs* the plan
implies (the source module of an entry's source tensors -> the target module of its target
tensor, and every enclosing pair whose entries stay together). Each pair's outputs are
compared in the order the target computes them:

- a pair whose outputs agree **proves** the entries below it;
- the first pair whose outputs differ although its input agrees (and no enclosing pair agrees:
  a layout convention may reorder a projection's outputs that its attention block then
  reorders back) is the **first divergence**; the entries below it that nothing proved
  **diverge**;
- the rest are **not reached** (what they compute already depends on the divergence, or
  they did not run).

When the model outputs agree, every entry whose module ran is proved. A target tensor the
conversion did not fill is a failure only when it feeds the compared outputs (its values are
perturbed once to find out); a pooler that nothing compared reads is a warning.

:func:`verify_conversion` with ``repair=True`` also tries the alternatives already known for the
first divergence (see :func:`_candidates`): the convention catalogue, a transpose of a square
weight, exchanging sources of equally shaped entries, the order of a concatenation, and
exchanging whole equally built modules. It keeps a change only when the diverging module then
agrees, moves on to the next divergence, and stops when the outputs agree or the candidates are
spent. Every trial costs one forward pass of the target; the report counts them.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from weight_mapper.apply import apply_plan
from weight_mapper.errors import ConversionError, PlanError
from weight_mapper.plan import MappingPlan, PlanEntry

__all__ = ["VerificationReport", "ModuleCheck", "verify_conversion", "verify_checkpoint", "load_source_weights",
           "ENTRY_STATUSES"]

#: What the layer-wise proof says of each entry.
ENTRY_STATUSES = ("proved", "diverges", "not reached")
_RTOL = 1e-4  # module outputs agree when max |diff| <= atol + _RTOL * max |source output|
_MAX_TRIALS = 400  # repair: forward passes of the target at most, over all divergences
_MAX_SWAPS = 64  # repair: exchanges tried per divergence
_MAX_PARTNERS = 8  # repair: exchanges tried per suspect entry


@dataclass(frozen=True)
class ModuleCheck:
    """One compared module pair.

    Attributes:
        source, target: Module paths.
        status: ``"match"``, ``"diverges"`` (input agrees, output differs), ``"inherits"``
            (its input already differed), ``"incomparable"`` (no output tensors of equal shape)
            or ``"not run"``.
        max_abs_diff: Largest absolute difference of the outputs (None when not compared).
        entries: Target keys of the plan entries below the target module.
    """

    source: str
    target: str
    status: str
    max_abs_diff: float | None
    entries: tuple[str, ...]


@dataclass(frozen=True)
class VerificationReport:
    """What running both models after the conversion showed.

    Attributes:
        max_abs_diff: Largest absolute difference over every compared output tensor.
        n_outputs: How many output tensors were compared.
        untouched: Target keys the conversion did not fill (left at their initial values).
        unexpected: Converted keys the target does not have.
        atol: Tolerance ``ok`` was judged with.
        idle: Untouched target keys that do not feed the compared outputs (a warning, not a
            failure: e.g. a pooler the source has no counterpart of).
        entry_status: Target key -> ``"proved"``, ``"diverges"`` or ``"not reached"``.
        first_divergence: The first module pair whose outputs differ (None if none).
        modules: Every compared module pair, in the order the target ran them.
        source_weights: How the plan's source tensors were obtained from the source model.
        n_forward: Forward passes run (both models, perturbation checks, repair trials).
        repairs: What repair changed, one line per kept change.
        plan: The plan with each entry's provenance (``proved`` / ``repaired`` / ``matched``).
    """

    max_abs_diff: float
    n_outputs: int
    untouched: tuple[str, ...]
    unexpected: tuple[str, ...]
    atol: float
    idle: tuple[str, ...] = ()
    entry_status: Mapping[str, str] = field(default_factory=dict)
    first_divergence: ModuleCheck | None = None
    modules: tuple[ModuleCheck, ...] = ()
    source_weights: str = ""
    n_forward: int = 0
    repairs: tuple[str, ...] = ()
    plan: MappingPlan | None = None

    @property
    def unfilled(self) -> tuple[str, ...]:
        """Untouched target keys that feed the compared outputs (these fail the proof)."""
        idle = set(self.idle)
        return tuple(k for k in self.untouched if k not in idle)

    @property
    def ok(self) -> bool:
        """Outputs agree within ``atol`` and every target tensor feeding them was filled."""
        return self.max_abs_diff <= self.atol and not self.unfilled and not self.unexpected

    def counts(self) -> dict[str, int]:
        """Entries per status."""
        return {s: sum(v == s for v in self.entry_status.values()) for s in ENTRY_STATUSES}

    def message(self) -> str:
        verdict = "conversion verified" if self.ok else "conversion NOT verified"
        parts = [f"{verdict}: max abs output difference {self.max_abs_diff:.3g} over {self.n_outputs} output tensor(s) "
                 f"(atol {self.atol:g})"]
        if self.entry_status:
            c = self.counts()
            parts.append(f"layer-wise: {c['proved']} entries proved, {c['diverges']} diverge, {c['not reached']} not "
                         f"reached ({len(self.modules)} module pairs compared, {self.n_forward} forward passes)")
        if self.first_divergence is not None:
            d = self.first_divergence
            feeding = [k for k in d.entries if self.entry_status.get(k) == "diverges"] or list(d.entries)
            parts.append(f"first divergence: {d.source or '(root)'} -> {d.target or '(root)'} (max abs difference "
                         f"{d.max_abs_diff:.3g}); entries feeding it: " + _few(feeding))
        for line in self.repairs:
            parts.append(f"repaired: {line}")
        unfilled = self.unfilled
        if unfilled:
            parts.append(f"{len(unfilled)} target tensor(s) left at their initial values: " + _few(unfilled))
        if self.idle:
            parts.append(f"warning: {len(self.idle)} target tensor(s) left at their initial values do not feed the "
                         "compared outputs: " + _few(self.idle))
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} converted key(s) the target does not have: " + _few(self.unexpected))
        if self.source_weights:
            parts.append(f"source weights: {self.source_weights}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the CLI's ``--json`` output)."""
        d = self.first_divergence
        return {
            "ok": self.ok, "max_abs_diff": self.max_abs_diff, "n_outputs": self.n_outputs, "atol": self.atol,
            "untouched": list(self.untouched), "idle": list(self.idle), "unexpected": list(self.unexpected),
            "entry_status": dict(self.entry_status), "counts": self.counts(),
            "first_divergence": None if d is None else {
                "source": d.source, "target": d.target, "max_abs_diff": d.max_abs_diff,
                "entries": [k for k in d.entries if self.entry_status.get(k) == "diverges"]},
            "n_forward": self.n_forward, "repairs": list(self.repairs), "source_weights": self.source_weights,
        }


def _few(keys, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------------------- running
def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple, list, dict or a ModelOutput), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors(v)]
    return []


def _floats(output: Any) -> list[torch.Tensor]:
    return [t.detach().clone() for t in _tensors(output) if t.is_floating_point() or t.is_complex()]


def _call(model: nn.Module, dummy_input: Any) -> Any:
    if isinstance(dummy_input, Mapping):
        return model(**dummy_input)
    if isinstance(dummy_input, (tuple, list)):
        return model(*dummy_input)
    return model(dummy_input)


def _run(model: nn.Module, dummy_input: Any) -> list[torch.Tensor]:
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            return _tensors(_call(model, dummy_input))
    finally:
        model.train(was_training)


@dataclass
class _Record:
    """What one forward pass showed: per hooked module, its calls' first input and outputs."""

    outputs: list[torch.Tensor]
    inputs: dict[str, list[torch.Tensor | None]]
    results: dict[str, list[list[torch.Tensor]]]
    order: dict[str, int]  # module -> rank of its first completed call


def _record(model: nn.Module, dummy_input: Any, modules: list[str], *, label: str) -> _Record:
    """Run ``model`` once with hooks on ``modules``; raise ConversionError if it fails."""
    inputs: dict[str, list] = {m: [] for m in modules}
    results: dict[str, list] = {m: [] for m in modules}
    order: dict[str, int] = {}
    handles = []
    named = dict(model.named_modules())

    def hook(name):
        def fn(module, args, kwargs, output):
            first = next((t for t in _tensors(args) + _tensors(list(kwargs.values()))
                          if t.is_floating_point()), None)
            inputs[name].append(None if first is None else first.detach().clone())
            results[name].append(_floats(output))
            order.setdefault(name, len(order))
        return fn

    try:
        for m in modules:
            if m in named:
                handles.append(named[m].register_forward_hook(hook(m), with_kwargs=True))
        # nn.TransformerEncoderLayer's fused fast path skips its submodules, and their hooks
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            outputs = _run(model, dummy_input)
        except Exception as exc:  # noqa: BLE001 - user code: report it with context
            raise ConversionError(f"running {label} {type(model).__name__} on dummy_input failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    finally:
        for h in handles:
            h.remove()
    return _Record([t.detach() for t in outputs], inputs, results, order)


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float] | None:
    """(max abs difference, max abs of ``a``) over the float tensors of equal shape, in order."""
    pairs = []
    for x, y in zip(a, b):
        if x.shape != y.shape:
            if x.numel() != y.numel() or [d for d in x.shape if d != 1] != [d for d in y.shape if d != 1]:
                continue
            y = y.reshape(x.shape)
        if x.is_complex() != y.is_complex():
            continue
        pairs.append((x, y))
    if not pairs:
        return None
    diff = max(float((x - y).abs().max()) if x.numel() else 0.0 for x, y in pairs)
    scale = max(float(x.abs().max()) if x.numel() else 0.0 for x, _ in pairs)
    return diff, scale


def _output_diff(expected: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, int] | None:
    """(max abs difference, number of tensors) over the model outputs of equal shape, in order."""
    pairs = [(a, b) for a, b in zip(expected, got) if a.shape == b.shape and a.is_floating_point()]
    if not pairs:
        return None
    return max(float((a.float() - b.float()).abs().max()) if a.numel() else 0.0 for a, b in pairs), len(pairs)


def _close(result: tuple[float, float] | None, atol: float) -> bool | None:
    if result is None:
        return None
    diff, scale = result
    return diff <= atol + _RTOL * scale


# ---------------------------------------------------------------------------- module pairs
def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(module: str):
    while module:
        yield module
        module = _owner(module)


def _common(paths: set[str]) -> str:
    split = [p.split(".") if p else [] for p in paths]
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


@dataclass(frozen=True)
class _Pair:
    source: str
    target: str
    entries: tuple[int, ...]


def _module_pairs(plan: MappingPlan, source: nn.Module, target: nn.Module) -> list[_Pair]:
    """Module pairs whose entries are exactly the plan entries below both modules."""
    src_modules = {n for n, _ in source.named_modules()}
    tgt_modules = {n for n, _ in target.named_modules()}
    prefix = plan.source_prefix
    entry_src = [{_owner(s[len(prefix):] if prefix and s.startswith(prefix) else s) for s in e.source}
                 for e in plan.entries]
    under_tgt: dict[str, list[int]] = {}
    under_src: dict[str, set[int]] = {}
    for i, e in enumerate(plan.entries):
        for a in _ancestors(_owner(e.target)):
            under_tgt.setdefault(a, []).append(i)
        for m in entry_src[i]:
            for a in _ancestors(m):
                under_src.setdefault(a, set()).add(i)
    pairs = []
    for t, idx in under_tgt.items():
        s = _common(set().union(*(entry_src[i] for i in idx)))
        if t in tgt_modules and s and s in src_modules and under_src.get(s, set()) == set(idx):
            pairs.append(_Pair(s, t, tuple(idx)))
    pairs.append(_Pair("", "", tuple(range(len(plan.entries)))))  # the whole models
    return pairs


# ---------------------------------------------------------------------------- source weights
def load_source_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], *, label: str = "checkpoint") -> str:
    """Load a checkpoint's tensors into the model it was saved from, even under other names.

    transformers 5 renames (and fuses) hub keys while loading, so a checkpoint's on-disk names
    need not be the model's ``state_dict()`` names: then they are mapped onto the model's with
    weight_mapper itself (the result is checked: every model tensor must be filled).

    Returns:
        How the tensors were loaded, in words.

    Raises:
        ConversionError: If a tensor's shape does not fit, or the names cannot be mapped.
    """
    own = model.state_dict()
    if all(k in tensors for k in own if _is_weight(own[k])):
        state = {k: tensors[k] for k in own if k in tensors}
        how = f"{label} loaded by name into the source model"
    else:
        from weight_mapper.mapper import WeightMapper

        shapes = {k: torch.empty(tuple(v.shape), device="meta") for k, v in tensors.items()}
        mapper = WeightMapper(shapes, {k: torch.empty(tuple(v.shape), device="meta") for k, v in own.items()})
        mapper.suggest_mapping()
        name_plan = mapper.get_plan()
        missing = [k for k in name_plan.unmatched_target if _is_weight(own[k])]
        if missing:
            raise ConversionError(f"{label}: its names are not the source model's and no mapping fills "
                                  f"{_few(missing, 5)}; pass the model {label} was saved from")
        state = apply_plan(name_plan, tensors, source=label)
        how = (f"{label}'s names differ from the source model's state_dict(): mapped onto them by weight_mapper "
               f"({sum(e.source != (e.target,) for e in name_plan.entries)} renamed or combined), then loaded")
    _check_shapes(state, own, f"{label} -> source model {type(model).__name__}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ConversionError(f"{label}: loading into {type(model).__name__} failed: {exc}") from None
    return how


def _is_weight(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _check_shapes(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise ConversionError(f"{where}: size mismatch for {k}: the converted tensor has shape {list(v.shape)}, "
                                  f"the model's is {list(own[k].shape)}; the plan does not fit this model")


def _plan_source_tensors(plan: MappingPlan, source: nn.Module) -> tuple[Mapping[str, torch.Tensor], str]:
    """The source model's tensors under the names the plan uses, and how they were found.

    Raises:
        PlanError: If the plan's source names cannot be found or mapped.
    """
    prefix = plan.source_prefix
    needed = {s for e in plan.entries for s in e.source}
    state = {prefix + k: v for k, v in source.state_dict().items()}
    if needed <= state.keys():
        return state, "the source model's state_dict()"
    if hasattr(source, "save_pretrained"):  # transformers writes the on-disk (hub) names back
        from weight_mapper.checkpoint import load_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            try:
                source.save_pretrained(tmp)
                ckpt = load_checkpoint(tmp)
                saved = {prefix + k: ckpt.tensors[k].clone() for k in ckpt.tensors}
            except Exception:  # noqa: BLE001 - fall back to mapping the names
                saved = {}
        if needed <= saved.keys():
            return saved, ("the plan names the checkpoint's on-disk keys, not the source model's state_dict(): "
                           "read them through the model's own save_pretrained()")
    from weight_mapper.mapper import WeightMapper

    shapes = {}
    for e in plan.entries:
        src_shapes = e.args.get("source_shapes") or [e.source_shape] * len(e.source)
        for s, shape in zip(e.source, src_shapes):
            shapes[s[len(prefix):] if prefix and s.startswith(prefix) else s] = torch.empty(tuple(shape), device="meta")
    name_mapper = WeightMapper(source, shapes, trace=False)
    name_mapper.suggest_mapping()
    name_plan = name_mapper.get_plan()
    mapped = {prefix + k: v for k, v in apply_plan(name_plan, source.state_dict(), source="source model").items()}
    missing = sorted(needed - mapped.keys())
    if missing:
        raise PlanError(f"the plan needs source tensor(s) {_few(missing, 5)} that the source model "
                        f"{type(source).__name__} does not have under any name weight_mapper can map; verify with "
                        "the model the plan's checkpoint was saved from")
    return mapped, (f"the plan names the checkpoint's on-disk keys, not the source model's state_dict(): mapped "
                    f"onto them by weight_mapper ({sum(e.source != (e.target,) for e in name_plan.entries)} renamed "
                    "or combined)")


# ---------------------------------------------------------------------------- the proof
class _Proof:
    """Both models, the converted tensors, and the source's recorded run (done once)."""

    def __init__(self, plan, source, target, dummy_input, source_tensors, atol):
        self.plan, self.source, self.target, self.dummy_input, self.atol = plan, source, target, dummy_input, atol
        self.entries = list(plan.entries)
        self.tensors = source_tensors
        self.own = target.state_dict()
        converted = apply_plan(plan, source_tensors, source=type(source).__name__)
        _check_shapes(converted, self.own, f"{type(source).__name__} -> {type(target).__name__}")
        self.unexpected = tuple(k for k in converted if k not in self.own)
        self.untouched = tuple(k for k in self.own if k not in converted)
        self._load(converted)
        self.pairs = _module_pairs(plan, source, target)
        self.owners = sorted({_owner(e.target) for e in self.entries})
        tgt_modules = sorted({p.target for p in self.pairs} | set(self.owners))
        self.src = _record(source, dummy_input, sorted({p.source for p in self.pairs}), label="source")
        self.tgt_modules = tgt_modules
        self.n_forward = 1

    def _load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        state = {k: v for k, v in tensors.items() if k in self.own}
        try:
            self.target.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ConversionError(f"loading the converted tensors into {type(self.target).__name__} failed: "
                                  f"{exc}") from None

    def set_entries(self, changes: Mapping[int, PlanEntry]) -> None:
        for i, e in changes.items():
            self.entries[i] = e
        sub = MappingPlan(tuple(changes.values()))
        converted = apply_plan(sub, self.tensors, source=type(self.source).__name__)
        _check_shapes(converted, self.own, f"{type(self.source).__name__} -> {type(self.target).__name__}")
        self._load(converted)

    def run(self) -> tuple[_Record, list[ModuleCheck]]:
        """Run the target once; check every pair, in the order the target completed them."""
        rec = _record(self.target, self.dummy_input, self.tgt_modules, label="target")
        self.n_forward += 1
        return rec, [self._check(p, rec) for p in sorted(self.pairs, key=lambda p: rec.order.get(p.target, 1 << 30))]

    def _check(self, p: _Pair, rec: _Record) -> ModuleCheck:
        keys = tuple(self.entries[i].target for i in p.entries)
        src_out, tgt_out = self.src.results.get(p.source, []), rec.results.get(p.target, [])
        if not src_out or not tgt_out:
            return ModuleCheck(p.source, p.target, "not run", None, keys)
        out = [_compare(a, b) for a, b in zip(src_out, tgt_out)]
        if all(o is None for o in out):
            return ModuleCheck(p.source, p.target, "incomparable", None, keys)
        diff = max(o[0] for o in out if o is not None)
        if all(_close(o, self.atol) is not False for o in out):
            return ModuleCheck(p.source, p.target, "match", diff, keys)
        ins = [_compare([a], [b]) for a, b in zip(self.src.inputs[p.source], rec.inputs[p.target])
               if a is not None and b is not None]
        inherited = any(_close(o, self.atol) is False for o in ins)
        return ModuleCheck(p.source, p.target, "inherits" if inherited else "diverges", diff, keys)


def _enclosing(target: str) -> list[str]:
    """The modules enclosing ``target``, innermost first, the root last."""
    return [*_ancestors(_owner(target)), ""] if target else []


def _first_divergence(checks: list[ModuleCheck], proof: _Proof | None = None,
                      rec: _Record | None = None) -> ModuleCheck | None:
    """The first pair that differs on its own account (see the module docstring).

    The earliest pair whose input agrees and output differs, unless an earlier one differs
    because it was paired with the wrong source module (its input is another source module's
    input: layer 0 given layer 3's weights); a pair whose input differs for any other reason
    (a convention inside its parent) is passed over.
    """
    matched = {c.target for c in checks if c.status == "match"}

    def covered(c: ModuleCheck) -> bool:
        return any(a in matched for a in _enclosing(c.target))

    for c in checks:
        if c.status not in ("diverges", "inherits") or covered(c):
            continue
        if c.status == "diverges" or (proof is not None and rec is not None and _realigned(proof, rec, c)):
            return c
    return next((c for c in checks if c.status == "inherits" and not covered(c)), None)


def _realigned(proof: _Proof, rec: _Record, c: ModuleCheck) -> list[_Pair]:
    """Other pairs whose source module got the input ``c``'s target module got."""
    got = rec.inputs.get(c.target) or [None]
    if got[0] is None:
        return []
    out = []
    for p in proof.pairs:
        if p.source == c.source or not p.source:
            continue
        seen = proof.src.inputs.get(p.source) or [None]
        if seen[0] is not None and _close(_compare([seen[0]], [got[0]]), proof.atol):
            out.append(p)
    return out


def _statuses(entries, checks, first, rec: _Record, outputs_agree: bool) -> dict[str, str]:
    ran = set(rec.order)
    out = {}
    proved = {k for c in checks if c.status == "match" for k in c.entries}
    diverging = set(first.entries) - proved if first is not None else set()
    if first is not None and not diverging:  # every part agrees alone: how they are combined does not
        diverging, proved = set(first.entries), proved - set(first.entries)
    for e in entries:
        owner = _owner(e.target)
        if outputs_agree:
            out[e.target] = "proved" if (owner == "" or owner in ran) else "not reached"
        elif e.target in proved:
            out[e.target] = "proved"
        elif e.target in diverging:
            out[e.target] = "diverges"
        else:
            out[e.target] = "not reached"
    return out


def _idle_untouched(proof: _Proof, untouched: tuple[str, ...], baseline: list[torch.Tensor]) -> tuple[str, ...]:
    """The untouched target tensors whose values do not change the compared outputs."""
    compared = [k for k, (a, b) in enumerate(zip(proof.src.outputs, baseline))
                if a.shape == b.shape and a.is_floating_point()]
    own = dict(proof.target.state_dict(keep_vars=True))
    floats = [k for k in untouched if own[k].is_floating_point()]
    idle = [k for k in untouched if not own[k].is_floating_point()]  # integer buffers: set by the constructor

    def feeds(keys: list[str]) -> bool:
        saved = {k: own[k].detach().clone() for k in keys}
        try:
            with torch.no_grad():
                for k in keys:
                    t = own[k]
                    t.add_(torch.randn_like(t) * (t.abs().mean() + 1.0))
            out = _run(proof.target, proof.dummy_input)
            proof.n_forward += 1
        finally:
            with torch.no_grad():
                for k in keys:
                    own[k].copy_(saved[k])
        return any(not torch.equal(baseline[k], out[k]) for k in compared if k < len(out))

    if floats and not feeds(floats):
        idle.extend(floats)
    elif floats:
        groups: dict[str, list[str]] = {}
        for k in floats:
            groups.setdefault(_owner(k), []).append(k)
        if len(groups) > 1 and len(groups) <= 8:
            for keys in groups.values():
                if not feeds(keys):
                    idle.extend(keys)
    return tuple(k for k in untouched if k in set(idle))


def verify_conversion(
    plan: MappingPlan,
    source: nn.Module,
    target: nn.Module,
    dummy_input: Any,
    *,
    atol: float = 1e-5,
    repair: bool = False,
    source_tensors: Mapping[str, torch.Tensor] | None = None,
) -> VerificationReport:
    """Convert ``source``'s weights with ``plan``, load them into ``target``, prove it layer by layer.

    ``target``'s tensors are overwritten by the converted ones (that is the point); both
    models run in eval mode without gradients and their training flags are restored.

    Args:
        plan: The plan to prove.
        source, target: The models (``source`` holds the weights to convert).
        dummy_input: What both models run on (a tensor, a tuple of arguments or a dict).
        atol: Largest absolute output difference that counts as equal.
        repair: Try the known alternatives for each divergence (see the module docstring);
            the report's ``plan`` is then the repaired plan.
        source_tensors: The checkpoint's tensors under the plan's names, when they are not
            ``source``'s own ``state_dict()`` (which ``source`` must hold already). By default
            they are read from ``source``, through ``save_pretrained`` or a name mapping when
            the plan names on-disk keys the model renames.

    Returns:
        A :class:`VerificationReport`.

    Raises:
        ConversionError: If a model fails on ``dummy_input``, a converted tensor does not fit
            the target, or the outputs cannot be compared.
        PlanError: If the plan's source tensors cannot be found.
    """
    if source_tensors is None:
        source_tensors, how = _plan_source_tensors(plan, source)
    else:
        how = "the given checkpoint tensors"
    proof = _Proof(plan, source, target, dummy_input, source_tensors, atol)
    rec, checks = proof.run()
    outputs = _output_diff(proof.src.outputs, rec.outputs)
    if outputs is None:
        raise ConversionError(
            f"{type(source).__name__} and {type(target).__name__} returned no output tensors of equal shape "
            "to compare; pass a dummy_input both accept and that yields comparable outputs"
        )
    repairs: list[str] = []
    changed: set[int] = set()
    if repair:
        rec, checks, outputs = _repair(proof, rec, checks, outputs, repairs, changed)
    diff = outputs[0]
    agree = diff <= atol
    first = None if agree else _first_divergence(checks, proof, rec)
    statuses = _statuses(proof.entries, checks, first, rec, agree)
    idle = _idle_untouched(proof, proof.untouched, rec.outputs) if proof.untouched else ()
    n_outputs = outputs[1]
    entries = []
    for i, e in enumerate(proof.entries):
        status = statuses[e.target]
        provenance = "repaired" if i in changed else "proved" if status == "proved" else e.provenance
        flags = tuple(f for f in e.flags if not (status == "proved" and f.startswith("convention:")))
        entries.append(replace(e, provenance=provenance, flags=flags))
    return VerificationReport(
        max_abs_diff=diff, n_outputs=n_outputs, untouched=proof.untouched, unexpected=proof.unexpected, atol=atol,
        idle=idle, entry_status=statuses, first_divergence=first, modules=tuple(checks), source_weights=how,
        n_forward=proof.n_forward, repairs=tuple(repairs), plan=replace(plan, entries=tuple(entries)),
    )


def verify_checkpoint(
    plan: MappingPlan,
    tensors: Mapping[str, torch.Tensor],
    source: nn.Module,
    target: nn.Module,
    dummy_input: Any,
    *,
    label: str = "checkpoint",
    atol: float = 1e-5,
) -> VerificationReport:
    """Prove the conversion of a checkpoint: load ``tensors`` into ``source``, then :func:`verify_conversion`.

    ``tensors`` are the checkpoint's, under the plan's names (a wrapper prefix the plan strips,
    ``plan.source_prefix``, is stripped before loading them into ``source``).

    Raises:
        ConversionError: as :func:`verify_conversion`; with ``option="source_model"`` when
            ``tensors`` do not load into ``source`` (it is not the model they were saved from).
    """
    prefix = plan.source_prefix
    state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: tensors[k] for k in tensors}
    try:
        how = load_source_weights(source, state, label=label)
    except ConversionError as e:
        raise ConversionError(str(e), option="source_model") from None
    report = verify_conversion(plan, source, target, dummy_input, atol=atol, source_tensors=tensors)
    return replace(report, source_weights=how)


# ---------------------------------------------------------------------------- repair
def _repair(proof: _Proof, rec, checks, outputs, repairs: list[str], changed: set[int]):
    """Fix divergences one at a time with the known alternatives; see the module docstring."""
    trials = 0
    while outputs[0] > proof.atol and trials < _MAX_TRIALS:
        first = _first_divergence(checks, proof, rec)
        if first is None:
            break
        fixed = False
        for label, change in _candidates(proof, first, checks, rec):
            if trials >= _MAX_TRIALS:
                break
            old = {i: proof.entries[i] for i in change}
            try:
                proof.set_entries(change)
            except (PlanError, ConversionError):
                proof.set_entries(old)
                continue
            trials += 1
            new_rec, new_checks = proof.run()
            new_outputs = _output_diff(proof.src.outputs, new_rec.outputs)
            if new_outputs is not None and (new_outputs[0] <= proof.atol or _agrees(new_checks, first.target)):
                rec, checks, outputs = new_rec, new_checks, new_outputs
                changed.update(change)
                repairs.append(f"{first.target or '(root)'}: {label}")
                fixed = True
                break
            proof.set_entries(old)
        if not fixed:
            break
    return rec, checks, outputs


def _agrees(checks: list[ModuleCheck], target: str) -> bool:
    """Whether the pair of ``target`` (or a pair enclosing it) now agrees."""
    matched = {c.target for c in checks if c.status == "match"}
    return any(a in matched for a in [target, *_enclosing(target)])


def _candidates(proof: _Proof, first: ModuleCheck, checks: list[ModuleCheck], rec: _Record):
    """Alternatives for the entries feeding ``first``, most specific first: ``(label, {index: entry})``."""
    from weight_mapper.conventions import (ROTARY_FLAG, _head_counts, convention_candidates, rotary_entry,
                                           rotary_heads_fit)

    entries = proof.entries
    target2index = {e.target: i for i, e in enumerate(entries)}
    proved = {k for c in checks if c.status == "match" for k in c.entries}
    below = [target2index[k] for k in first.entries if k in target2index]
    suspects = [i for i in below if entries[i].target not in proved]

    # 0. the pair got another source module's input: give it that module's tensors
    for p in _realigned(proof, rec, first) if first.status == "inherits" else []:
        mine = {entries[i].target[len(first.target):]: i for i in below}
        theirs = {entries[j].target[len(p.target):]: j for j in p.entries}
        if mine.keys() != theirs.keys() or any(
                entries[i].source_shape != entries[theirs[k]].source_shape for k, i in mine.items()):
            continue
        change = {}
        for k, i in mine.items():
            j = theirs[k]
            change[i] = replace(entries[i], source=entries[j].source)
            change[j] = replace(entries[j], source=entries[i].source)
        yield f"{first.target} <-> {p.target} (sources exchanged: {p.source} sees {first.target}'s input)", change

    # 1. the convention catalogue: the rotary q/k rows, all q/k entries below the module together
    # (with the q/k entries downstream that nothing proved yet: layers share their layout)
    all_rotary = convention_candidates(MappingPlan(tuple(entries)))
    rotary = [i for i in all_rotary if i in set(below)]
    if rotary:
        rotary = sorted(set(rotary) | {i for i in all_rotary if entries[i].target not in proved})
        n_heads = next((entries[i].args.get("n_heads") for i in rotary if "q" == _role_of(entries[i])), None)
        n_kv = next((entries[i].args.get("n_heads") for i in rotary if "k" == _role_of(entries[i])), None)
        h, kv = _head_counts(proof.target)
        if h is None:
            h, kv = _head_counts(proof.source)
        n_heads, n_kv = n_heads or h, n_kv or kv or n_heads or h
        current = {entries[i].transform for i in rotary}
        for transform in ("rotary_half", "rotary_interleave", None):
            if current == {transform}:
                continue
            if transform is not None and not all(rotary_heads_fit(entries[i], n_heads, n_kv) for i in rotary):
                continue
            change = {i: rotary_entry(entries[i], transform, n_heads, n_kv) for i in rotary}
            yield f"rotary q/k rows {transform or 'copied as they are'} ({ROTARY_FLAG})", change

    # 4. per suspect, in the order the target computes them (the culprit runs just before the
    #    first pair that differs): a transpose of a square weight, then an exchange of sources
    #    with an equally shaped entry (below the module, then flagged ones, then the nearest in
    #    plan order: layer 0 given layer 3's tensor). Last, two entries below it that each agree
    #    alone (modules matched the wrong way round each reproduce their source module).
    def rank(i: int) -> int:
        return next((rec.order[a] for a in [*_ancestors(_owner(entries[i].target)), ""] if a in rec.order),
                    len(rec.order))

    # Between the last pair that agrees and the first that does not is where it went wrong.
    ranks = {c.target: rec.order.get(c.target, len(rec.order)) for c in checks if c.target}
    bad = [ranks[c.target] for c in checks if c.target and c.status in ("diverges", "inherits")]
    first_bad = min(bad, default=len(rec.order))
    last_good = max((ranks[c.target] for c in checks if c.target and c.status == "match" and ranks[c.target] < first_bad),
                    default=-1)
    unranked = len(rec.order)  # a module used without being called (F.embedding(x, m.weight)) runs anywhere
    suspects = sorted(suspects, key=lambda i: (0 if last_good < rank(i) <= first_bad else 1 if rank(i) == unranked
                                               else 2, rank(i)))
    below_set, suspect_set = set(below), set(suspects)

    def exchangeable(a: PlanEntry, b: PlanEntry) -> bool:
        return (len(a.source) == 1 and len(b.source) == 1 and a.source != b.source and a.transform == b.transform
                and a.source_shape == b.source_shape and a.target_shape == b.target_shape)

    by_owner: dict[str, list[int]] = {}
    source2index: dict[str, int] = {}
    for k, e in enumerate(entries):
        by_owner.setdefault(_owner(e.target), []).append(k)
        if len(e.source) == 1:
            source2index.setdefault(e.source[0], k)

    def sibling(i: int) -> list[int]:
        """The entry holding the tensor the siblings' source module has under this entry's leaf."""
        mods = [_owner(entries[k].source[0]) for k in by_owner[_owner(entries[i].target)]
                if k != i and len(entries[k].source) == 1]
        if not mods or len(entries[i].source) != 1:
            return []
        module = max(set(mods), key=mods.count)
        j = source2index.get(f"{module}.{entries[i].source[0].rpartition('.')[2]}")
        return [] if j is None or j == i else [j]

    def partners(i: int) -> list[int]:
        inside = [j for j in below if j != i and j not in suspect_set]
        outside = sorted((j for j in range(len(entries)) if j not in below_set),
                         key=lambda j: (not entries[j].flagged, abs(j - i)))
        return sibling(i) + [j for j in suspects if j != i] + inside + outside

    tried: set[frozenset] = set()
    n = 0

    def exchange(i: int, j: int):
        a, b = entries[i], entries[j]
        tried.add(frozenset((i, j)))
        return (f"{a.target} <- {b.source[0]} and {b.target} <- {a.source[0]} (exchanged)",
                {i: replace(a, source=b.source), j: replace(b, source=a.source)})

    concats: dict[tuple[str, int], list[int]] = {}
    for i in suspects:
        if entries[i].transform == "concat" and 2 <= len(entries[i].source) <= 4:
            concats.setdefault((_owner(entries[i].target), len(entries[i].source)), []).append(i)
    for i in suspects:
        e = entries[i]
        group = concats.pop((_owner(e.target), len(e.source)), None) if e.transform == "concat" else None
        if group:  # the order of a concatenation's parts (a module's weight and bias alike)
            yield from _concat_orders(entries, group)
        if len(e.source) == 1 and len(e.target_shape) == 2 and e.target_shape[0] == e.target_shape[1] \
                and e.transform in (None, "transpose"):
            yield (f"{e.target} transposed" if e.transform is None else f"{e.target} not transposed",
                   {i: replace(e, transform=None if e.transform else "transpose", args={})})
        mine = 0
        for j in partners(i):
            if n >= _MAX_SWAPS or mine >= _MAX_PARTNERS:
                break
            if frozenset((i, j)) not in tried and exchangeable(e, entries[j]):
                n, mine = n + 1, mine + 1
                yield exchange(i, j)
    rest = [i for i in below if i not in suspect_set]
    for x, i in enumerate(rest):
        for j in rest[x + 1:]:
            if n >= 2 * _MAX_SWAPS:
                break
            if frozenset((i, j)) not in tried and exchangeable(entries[i], entries[j]):
                n += 1
                yield exchange(i, j)

    # 5. exchange whole modules built alike below the diverging one (layers, heads, branches)
    inside = first.target + "." if first.target else ""
    first_index: dict[str, int] = {}
    for i in sorted(below):
        for a in _ancestors(_owner(entries[i].target)):
            if a.startswith(inside):
                first_index.setdefault(a, i)
    modules = sorted(first_index, key=first_index.__getitem__)
    signatures = {m: _signature(entries, m) for m in modules}
    n = 0
    for x, m in enumerate(modules):
        for other in modules[x + 1:]:
            if not signatures[m] or signatures[other] != signatures[m] or other.startswith(m + ".") \
                    or m.startswith(other + "."):
                continue
            n += 1
            if n > _MAX_SWAPS:
                return
            change = {}
            for rel, _shape in signatures[m]:
                i, j = target2index[f"{m}.{rel}"], target2index[f"{other}.{rel}"]
                change[i] = replace(entries[i], source=entries[j].source)
                change[j] = replace(entries[j], source=entries[i].source)
            yield f"{m} <-> {other} (sources exchanged)", change


def _concat_orders(entries: list[PlanEntry], group: list[int]):
    """Every other order of the parts of the concatenations in ``group``, all alike."""
    n_parts = len(entries[group[0]].source)
    for perm in itertools.permutations(range(n_parts)):
        if list(perm) == list(range(n_parts)):
            continue
        change = {}
        for i in group:
            e = entries[i]
            shapes = e.args.get("source_shapes") or [list(e.source_shape)] * n_parts
            args = {**e.args, "sizes": [e.args["sizes"][p] for p in perm], "source_shapes": [shapes[p] for p in perm]}
            change[i] = replace(e, source=tuple(e.source[p] for p in perm), args=args)
        yield f"{_owner(entries[group[0]].target) or '(root)'}: concat order {list(perm)}", change


def _role_of(e: PlanEntry) -> str | None:
    from weight_mapper.conventions import _role

    return _role(e.target)


def _signature(entries: list[PlanEntry], module: str) -> tuple:
    prefix = module + "."
    return tuple(sorted((e.target[len(prefix):], tuple(e.target_shape)) for e in entries
                        if e.target.startswith(prefix) and len(e.source) == 1))


# ---------------------------------------------------------------------------- after matching
def settle_plan(
    plan: MappingPlan,
    *,
    source: nn.Module | None,
    target: nn.Module | None,
    dummy_input: Any,
    source_code: nn.Module | None = None,
    repair: bool = True,
    progress: Any = None,
) -> tuple[MappingPlan, list[str], VerificationReport | None]:
    """What follows matching: the convention catalogue, then (when it can run) a repairing proof.

    The proof runs only with both models holding real weights and an input; the target's
    tensors are restored afterwards, so matching changes no model.

    Returns:
        ``(plan, notes, report)``: the plan with conventions applied or flagged and, after a
        proof, each entry's provenance; what was done, in words; the proof's report or None.
    """
    from weight_mapper.conventions import apply_conventions
    from weight_mapper.errors import WeightMapperError

    plan, notes = apply_conventions(plan, source_module=source_code if source_code is not None else source,
                                    target_module=target)
    if not repair or source is None or target is None or dummy_input is None or not plan.entries:
        return plan, notes, None
    if any(t.is_meta for m in (source, target) for t in itertools.chain(m.parameters(), m.buffers())):
        return plan, notes, None
    if progress is not None:
        progress("layer-wise proof: running both models side by side")
    saved = {k: v.detach().clone() for k, v in target.state_dict().items()}
    try:
        report = verify_conversion(plan, source, target, dummy_input, repair=True)
    except WeightMapperError as exc:
        notes.append(f"layer-wise proof not run: {exc}")
        return plan, notes, None
    finally:
        target.load_state_dict(saved, strict=False)
    c = report.counts()
    notes.append(f"layer-wise proof ({report.n_forward} forward passes): {'verified' if report.ok else 'NOT verified'}, "
                 f"{c['proved']} proved, {c['diverges']} diverge, {c['not reached']} not reached"
                 + (f"; repaired: {'; '.join(report.repairs)}" if report.repairs else ""))
    return (report.plan if report.plan is not None else plan), notes, report
