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

Three ways to get the graph, all yielding ``{tensor name or module path: position in [0, 1]}``:

- :func:`record_execution_order` runs the model once on a ``dummy_input`` and follows every
  tensor through a ``TorchFunctionMode`` (any model that runs);
- :func:`trace_execution_order` reads the same graph from ``torch.fx.symbolic_trace`` without
  running anything (models whose ``forward`` has no data-dependent Python control flow, such
  as torchvision's and timm's; Hugging Face models usually fail to trace);
- :func:`auto_execution_order` needs no input: it synthesises one (:func:`synthesize_input`)
  and records the flow with every parameter and buffer swapped for a meta-device stand-in, so
  nothing is computed and no memory is spent; a model that cannot run on meta runs for real
  if it is small (:data:`REAL_RUN_MAX_PARAMS`).

:data:`FLOW_SOURCES` names where positions came from; plans record it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "record_execution_order",
    "trace_execution_order",
    "auto_execution_order",
    "synthesize_input",
    "flow_positions",
    "FLOW_SOURCES",
    "REAL_RUN_MAX_PARAMS",
]

_TIE_SHARE = 0.4  # call order may move a use by less than half a graph step (steps are 0.5 apart)

#: Where a side's data-flow positions came from.
FLOW_SOURCES = {
    "dummy_input": "a forward pass on the dummy_input given",
    "fx": "torch.fx.symbolic_trace (nothing ran)",
    "meta-synthetic": "a forward pass on a synthesised input, on the meta device (nothing computed)",
    "real-synthetic": "a forward pass on a synthesised input, on the model's device (it failed on meta)",
    "none": "no data flow",
}
#: A model that fails on the meta device is run for real only up to this many parameters.
REAL_RUN_MAX_PARAMS = 50_000_000
_SPATIAL = {1: (1024,), 2: (224, 224), 3: (16, 112, 112)}  # input size per conv dims (free on meta)
_TOKENS = 16


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


_NO_TENSORS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout,
               torch.memory_format, torch.Size, slice, type(Ellipsis))


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in an operation's arguments or result, in order.

    Called twice per torch operation while recording, so the plain containers an operation
    takes (tuples, lists, dicts of tensors and numbers) are walked directly; anything else
    (a ``ModelOutput``, a named tuple) goes through ``tree_flatten``.
    """
    if isinstance(tree, torch.Tensor):
        return [tree]
    kind = type(tree)
    if kind in _NO_TENSORS:
        return []
    if kind is tuple or kind is list:
        out: list[torch.Tensor] = []
        for x in tree:
            if isinstance(x, torch.Tensor):
                out.append(x)
            elif type(x) not in _NO_TENSORS:
                out += _tensors(x)
        return out
    if kind is dict:
        return _tensors(list(tree.values()))
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


def synthesize_input(module: nn.Module) -> Any:
    """An input ``module`` plausibly accepts, from what the model says about itself.

    Hugging Face models carry ``dummy_inputs`` (token ids; vision models get ``pixel_values`` of
    their configured size); otherwise the first input layer in definition
    order decides: a conv's ``in_channels`` (spatial size from ``pretrained_cfg["input_size"]``
    or ``config.image_size`` when the model has one, else 224), an embedding's vocabulary
    (token ids) or a Linear's ``in_features``. Batch size 1.

    Returns:
        A tensor, or a dict of keyword arguments; None if nothing says what the input is.

    >>> synthesize_input(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())).shape
    torch.Size([1, 3, 224, 224])
    >>> synthesize_input(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))).dtype
    torch.int64
    """
    main = getattr(module, "main_input_name", None)  # a Hugging Face model
    dummy = getattr(module, "dummy_inputs", None)
    if (isinstance(dummy, Mapping) and dummy and (main is None or main in dummy)
            and all(isinstance(v, torch.Tensor) for v in dummy.values())):
        return {k: v[:1] for k, v in dummy.items()}
    if main == "pixel_values":  # its generic dummy_inputs are token ids
        channels = getattr(getattr(module, "config", None), "num_channels", 3)
        return {main: torch.zeros(1, int(channels), *_spatial_size(module, 2))}
    for layer in module.modules():
        if isinstance(layer, nn.modules.conv._ConvNd):
            dims = len(layer.kernel_size)
            return torch.zeros(1, layer.in_channels, *_spatial_size(module, dims))
        if isinstance(layer, nn.Embedding):
            return torch.zeros(1, _TOKENS, dtype=torch.long)
        if isinstance(layer, nn.EmbeddingBag):
            return torch.zeros(1, _TOKENS, dtype=torch.long)
        if isinstance(layer, nn.Linear):
            return torch.zeros(1, layer.in_features)
    return None


def _spatial_size(module: nn.Module, dims: int) -> tuple[int, ...]:
    """The model's own input size if it states one (timm's pretrained_cfg, a HF config), else a default."""
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if isinstance(size, (tuple, list)) and len(size) == dims + 1:
        return tuple(int(d) for d in size[1:])
    image_size = getattr(getattr(module, "config", None), "image_size", None)
    if isinstance(image_size, int) and dims == 2:
        return image_size, image_size
    return _SPATIAL[dims]


def auto_execution_order(module: nn.Module) -> tuple[dict[str, float] | None, str]:
    """Place each tensor in the data flow without being given an input or spending memory.

    Runs ``module`` once on :func:`synthesize_input`'s input with every parameter and buffer
    replaced by a meta-device tensor of its shape (``torch.func.functional_call``; the module
    itself is not changed), so no value is computed. A model that fails on meta (code that
    reads values, tensors kept outside its parameters and buffers) is run for real if it has
    at most :data:`REAL_RUN_MAX_PARAMS` parameters.

    Returns:
        ``(positions or None, how)``, ``how`` a key of :data:`FLOW_SOURCES`
        (``"meta-synthetic"``, ``"real-synthetic"`` or ``"none"``).

    >>> order, how = auto_execution_order(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    >>> how, order["0.weight"] < order["2.weight"]
    ('meta-synthetic', True)
    """
    inputs = synthesize_input(module)
    if inputs is None:
        return None, "none"
    # Some meta kernels accept only half precision (grouped_mm in transformers' MoE layers): a
    # second try in bfloat16 places the same graph.
    for dtype in (None, torch.bfloat16):
        order = _record_on_meta(module, inputs, dtype)
        if order is not None:
            return order, "meta-synthetic"
    n_params = sum(p.numel() for p in module.parameters())
    if n_params <= REAL_RUN_MAX_PARAMS and not any(p.is_meta for p in module.parameters()):
        order = _record(module, inputs, _tensor_names(module), module)
        if order is not None:
            return order, "real-synthetic"
    return None, "none"


def _record_on_meta(module: nn.Module, inputs: Any, dtype: torch.dtype | None) -> dict[str, float] | None:
    """Positions from one forward pass with a meta stand-in (of ``dtype`` if floating) for every tensor."""
    stand_ins: dict[int, torch.Tensor] = {}
    named = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if id(t) not in stand_ins:
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
            stand_ins[id(t)] = torch.empty_like(t, device="meta", dtype=cast)
        named[name] = stand_ins[id(t)]
    tensor2name: dict[int, str] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor) and id(value) in stand_ins:
            tensor2name.setdefault(id(stand_ins[id(value)]), name)

    def to_meta(x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.to("meta", dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)

    def call(*args, **kwargs):
        return torch.func.functional_call(module, named, args, kwargs, tie_weights=False, strict=False)

    return _record(module, tree_map(to_meta, inputs), tensor2name, call)


def _record(module: nn.Module, inputs: Any, tensor2name: Mapping[int, str], call) -> dict[str, float] | None:
    """Positions from one call of ``call`` on ``inputs`` in eval mode, or None if it raised."""
    recorder = _FlowRecorder(tensor2name)
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recorder.mark_inputs(inputs)
            with recorder:
                if isinstance(inputs, Mapping):
                    call(**inputs)
                elif isinstance(inputs, (tuple, list)):
                    call(*inputs)
                else:
                    call(inputs)
    except Exception:  # noqa: BLE001 - any failure of user code only disables this signal
        return None
    finally:
        module.train(was_training)
    return flow_positions(recorder.uses, _module_paths(module)) or None


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
