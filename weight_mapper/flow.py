"""Stage 1b: where each tensor sits in the model's data flow, from a forward pass or a trace.

Definition order says where a layer was written down and call order when it happened to run,
but independent branches may be written and run in any order: torchvision's RegNet computes
its shortcut *before* the residual branch (``proj(x) + f(x)``), timm's after it. The data-flow
graph between the tensors' uses does not depend on that choice. Each *use* (an operation that
reads a parameter or buffer together with data derived from the input) is placed by its depth
in that graph: ``(asap + alap) / 2``, the mean of its earliest and latest possible step. The
first conv of a residual branch must run at the block's first step (asap = alap), a shortcut
conv can run anywhere until the addition (late alap), so both implementations place them alike.
Call order only breaks ties (q/k/v projections, which are parallel).

Two ways to get the graph, both yielding ``{tensor name or module path: position in [0, 1]}``:

- :func:`record_execution_order` runs the model once on a ``dummy_input`` and follows every
  tensor through a ``TorchFunctionMode`` (any model that runs);
- :func:`trace_execution_order` reads the same graph from ``torch.fx.symbolic_trace`` without
  running anything (models whose ``forward`` has no data-dependent Python control flow, such
  as torchvision's and timm's; Hugging Face models usually fail to trace and get no positions).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["record_execution_order", "trace_execution_order", "flow_positions"]

_TIE_SHARE = 0.4  # call order may move a use by less than half a graph step (steps are 0.5 apart)


def flow_positions(uses: list[tuple[frozenset[str], frozenset[int]]], module_paths: Iterable[str]) -> dict[str, float]:
    """Positions of tensors and modules from a list of uses in call order.

    Args:
        uses: ``(tensor names read, earlier uses whose results it reads)`` per use, in the order
            the uses happened (a topological order of the graph).
        module_paths: Every module path; a module's position is the earliest position of a
            tensor in its subtree.

    Returns:
        Tensor name or module path -> position in [0, 1]. Tensors no use reads (BatchNorm's
        ``num_batches_tracked`` in eval mode) and modules without used tensors are absent.

    >>> pos = flow_positions([(frozenset({"a.w"}), frozenset()), (frozenset({"b.w"}), frozenset()),
    ...                       (frozenset({"c.w"}), frozenset({0})), (frozenset({"d.w"}), frozenset({1, 2}))],
    ...                      ["", "a", "b", "c", "d"])
    >>> pos["a.w"] < pos["b.w"] < pos["c.w"] < pos["d.w"]  # b, a shortcut beside a -> c, sits mid-branch
    True
    """
    n = len(uses)
    if n == 0:
        return {}
    asap = np.zeros(n)
    for u, (_, preds) in enumerate(uses):
        if preds:
            asap[u] = 1 + max(asap[p] for p in preds)
    last = asap.max()
    alap = np.full(n, last)
    for u in range(n - 1, -1, -1):
        for p in uses[u][1]:
            alap[p] = min(alap[p], alap[u] - 1)
    key = (asap + alap) / 2 + _TIE_SHARE * np.arange(n) / n
    key = (key - key.min()) / max(key.max() - key.min(), 1e-12)
    out: dict[str, float] = {}
    for u, (names, _) in enumerate(uses):
        for name in names:
            out.setdefault(name, float(key[u]))  # first use
    return _with_modules(out, module_paths)


def _with_modules(tensor_pos: dict[str, float], module_paths: Iterable[str]) -> dict[str, float]:
    """Add each module's position: the earliest of the tensors below it."""
    out = dict(tensor_pos)
    paths = set(module_paths)
    for name, value in tensor_pos.items():
        module = name.rpartition(".")[0]
        while True:
            if module in paths and (module not in out or out[module] > value):
                out[module] = value
            if not module:
                break
            module = module.rpartition(".")[0]
    return out


def _step(uses: list, names: set[str], reads: set[int], is_data: bool) -> tuple[str, frozenset] | None:
    """The rule both graph sources apply to one operation, given what its inputs are.

    Reading data and parameters (``names``) is a new use, whose result is data derived from
    it; data alone passes on the uses it derives from (``reads``); parameters alone give a
    parameter-derived result (``weight.t()``). Returns ``("data", uses)`` or ``("params",
    names)`` for the result, or None for a constant.
    """
    if is_data and names:
        uses.append((frozenset(names), frozenset(reads)))
        return "data", frozenset({len(uses) - 1})
    if is_data:
        return "data", frozenset(reads)
    if names:
        return "params", frozenset(names)
    return None


class _FlowRecorder(TorchFunctionMode):
    """Follows data from the inputs through every torch operation, recording parameter uses.

    A tensor is *data* (carrying the uses it derives from), *parameter-derived* (carrying the
    names of the parameters it was computed from, e.g. ``weight.t()``) or a constant. An
    operation reading data and parameter-derived tensors is a use of those parameters.
    """

    def __init__(self, tensor2name: Mapping[int, str]):
        super().__init__()
        self.tensor2name = tensor2name
        self.data: dict[int, frozenset[int]] = {}
        self.params: dict[int, frozenset[str]] = {}
        self.keep: list[torch.Tensor] = []  # tensors stay alive, so their ids are not reused
        self.uses: list[tuple[frozenset[str], frozenset[int]]] = []

    def mark_inputs(self, inputs: Any) -> None:
        for t in _tensors(inputs):
            self.data[id(t)] = frozenset()
            self.keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        data: set[int] = set()
        names: set[str] = set()
        is_data = False
        for t in _tensors((args, kwargs)):
            key = id(t)
            if key in self.tensor2name:
                names.add(self.tensor2name[key])
            elif key in self.params:
                names |= self.params[key]
            elif key in self.data:
                data |= self.data[key]
                is_data = True
        label = _step(self.uses, names, data, is_data)
        if label is not None:
            self._label(out, self.data if label[0] == "data" else self.params, label[1])
        return out

    def _label(self, out: Any, table: dict, value: frozenset) -> None:
        for t in _tensors(out):
            if id(t) in self.tensor2name:
                continue  # an in-place op on a parameter does not make it data
            self.data.pop(id(t), None)
            self.params.pop(id(t), None)
            table[id(t)] = value
            self.keep.append(t)


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def _tensor_names(module: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor):
            out.setdefault(id(value), name)
    return out


def _module_paths(module: nn.Module) -> list[str]:
    return [path for path, _ in module.named_modules(remove_duplicate=False)]


def record_execution_order(module: nn.Module, dummy_input: Any) -> dict[str, float] | None:
    """Run ``module`` once on ``dummy_input`` and place each tensor and module in its data flow.

    The model runs in eval mode under ``torch.no_grad()`` (so BatchNorm statistics are not
    updated) and its training flag is restored afterwards. ``dummy_input`` is a tensor, a
    tuple/list of positional arguments, or a dict of keyword arguments.

    Returns:
        Tensor name or module path -> position in [0, 1] (see :func:`flow_positions`), or None
        (with a warning) if the forward pass failed.

    >>> order = record_execution_order(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), torch.ones(1, 2))
    >>> order["0"] < order["2"]
    True
    """
    recorder = _FlowRecorder(_tensor_names(module))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            recorder.mark_inputs(dummy_input)
            with recorder:
                if isinstance(dummy_input, Mapping):
                    module(**dummy_input)
                elif isinstance(dummy_input, (tuple, list)):
                    module(*dummy_input)
                else:
                    module(dummy_input)
    except Exception as exc:  # noqa: BLE001 - any failure of user code only disables this signal
        warnings.warn(
            f"forward pass of {type(module).__name__} on dummy_input failed ({type(exc).__name__}: "
            f"{exc}); continuing without execution order",
            stacklevel=2,
        )
        return None
    finally:
        module.train(was_training)
    return flow_positions(recorder.uses, _module_paths(module)) or None


def trace_execution_order(module: nn.Module) -> dict[str, float] | None:
    """Place each tensor and module in the data flow of ``torch.fx.symbolic_trace(module)``.

    Nothing runs: the trace reads ``forward``'s code with proxies, so it works on meta-device
    models and needs no input. Models whose ``forward`` branches on tensor values cannot be
    traced; for them this returns None (no warning: the caller falls back to no order).

    >>> order = trace_execution_order(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    >>> order["0.weight"] < order["2.weight"]
    True
    """
    from torch import fx

    try:
        graph = fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - untraceable code is common and only disables this signal
        return None
    tensor_names = {n for n, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    below: dict[str, set[str]] = {}  # module path -> the tensor names in its subtree
    for name in tensor_names:
        module_path = name.rpartition(".")[0]
        while module_path:
            below.setdefault(module_path, set()).add(name)
            module_path = module_path.rpartition(".")[0]
    data: dict[fx.Node, frozenset[int]] = {}
    params: dict[fx.Node, frozenset[str]] = {}
    uses: list[tuple[frozenset[str], frozenset[int]]] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            data[node] = frozenset()
            continue
        if node.op == "get_attr":
            if node.target in tensor_names:
                params[node] = frozenset({node.target})
            continue
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        names: set[str] = set()
        if node.op == "call_module":  # a leaf module (torch.nn's own): its tensors are read here
            names = set(below.get(node.target, ()))
        reads = set()
        is_data = False
        for arg in node.all_input_nodes:
            if arg in params:
                names |= params[arg]
            elif arg in data:
                reads |= data[arg]
                is_data = True
        label = _step(uses, names, reads, is_data)
        if label is not None:
            (data if label[0] == "data" else params)[node] = label[1]
    return flow_positions(uses, _module_paths(module)) or None
