import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fixture_models import BatchNormed, Tied
from weight_mapper import MappingError
from weight_mapper.names import name_indices, name_skeleton, name_tokens
from weight_mapper.table import TensorTable


def test_module_table_has_parameters_and_persistent_buffers_in_order():
    table = TensorTable.from_module(BatchNormed())
    assert table.names[:7] == (
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "bn1.num_batches_tracked", "conv2.weight",
    )
    assert table.is_buffer.tolist()[:6] == [False, False, False, True, True, True]
    assert table.module_types[1] == "BatchNorm2d"
    assert table.shapes[5] == ()


def test_non_persistent_buffers_are_left_out():
    m = nn.Linear(2, 2)
    m.register_buffer("cache", torch.zeros(3), persistent=False)
    assert TensorTable.from_module(m).names == ("weight", "bias")


def test_tied_weights_are_aliases():
    table = TensorTable.from_module(Tied())
    head = table.name2row["head.weight"]
    assert table.alias_of[head] == table.name2row["embed.weight"]
    assert table.is_canonical.sum() == len(table) - 1


def test_tied_tensors_in_a_state_dict_are_aliases():
    table = TensorTable.from_state_dict(Tied().state_dict())
    assert table.alias_of[table.name2row["head.weight"]] == table.name2row["embed.weight"]


def test_equal_but_separate_tensors_are_not_aliases():
    w = torch.zeros(3)
    table = TensorTable.from_state_dict({"a": w, "b": w.clone(), "c": torch.empty(0), "d": torch.empty(0)})
    assert (table.alias_of == -1).all()


def test_state_dict_skips_non_tensors_with_a_warning():
    with pytest.warns(UserWarning, match="skipped 2 non-tensor entries: 'epoch', 'note'"):
        table = TensorTable.from_state_dict({"w": torch.zeros(2), "epoch": 3, "note": "x"})
    assert table.names == ("w",)


def test_empty_or_tensorless_inputs_raise():
    with pytest.raises(MappingError, match="contains no tensors"):
        TensorTable.from_state_dict({})
    with pytest.raises(MappingError, match="ReLU has no parameters"):
        TensorTable.from_module(nn.ReLU())


def test_shapes_and_meta_tensors_need_no_data():
    with torch.device("meta"):
        model = BatchNormed()
    meta = TensorTable.from_module(model)
    real = TensorTable.from_module(BatchNormed())
    assert meta.shapes == real.shapes and meta.names == real.names
    assert (meta.alias_of == -1).all()
    shapes = TensorTable.from_state_dict({n: s for n, s in zip(real.names, real.shapes)})
    assert shapes.shapes == real.shapes


def test_derived_columns():
    table = TensorTable.from_state_dict({"a.b.weight": (3, 2), "c": (4,)})
    assert table.modules == ("a.b", "")
    assert table.ndim.tolist() == [2, 1]
    assert table.numel.tolist() == [6, 4]
    assert table.shape_matrix.tolist() == [[3, 2], [4, -1]]


def test_safetensors_rows_are_in_natural_order_and_marked_unordered(tmp_path):
    from safetensors.torch import save_file

    from weight_mapper import load_checkpoint

    path = tmp_path / "m.safetensors"
    save_file({"layers.10.w": torch.zeros(1), "layers.2.w": torch.zeros(1), "head.w": torch.zeros(1)}, path)
    table = TensorTable.from_checkpoint(load_checkpoint(path))
    assert table.names == ("head.w", "layers.2.w", "layers.10.w")
    assert not table.ordered
    assert TensorTable.from_state_dict({"a": (1,)}).ordered


def test_with_module_takes_order_types_and_buffers_from_the_model():
    model = BatchNormed()
    sorted_ckpt = TensorTable.from_state_dict(model.state_dict(), natural_order=True)
    described = sorted_ckpt.with_module(model)
    reference = TensorTable.from_module(model)
    assert described.names == reference.names and described.ordered
    assert described.module_types == reference.module_types
    assert described.is_buffer.tolist() == reference.is_buffer.tolist()


def test_with_module_keeps_tied_weights_tied():
    described = TensorTable.from_state_dict(Tied().state_dict()).with_module(Tied())
    assert described.alias_of[described.name2row["head.weight"]] == described.name2row["embed.weight"]


def test_with_module_names_what_does_not_fit():
    state_dict = {k: v for k, v in BatchNormed().state_dict().items() if k != "fc.bias"}
    state_dict["conv1.weight"] = torch.zeros(1)
    with pytest.raises(MappingError, match=r"state_dict is not a state dict of BatchNormed: missing: fc.bias; "
                                           r"shape conflicts: conv1.weight \[1\] vs \[8, 3, 3, 3\]"):
        TensorTable.from_state_dict(state_dict).with_module(BatchNormed())


_COMPONENTS = ["0", "3", "12", "layers", "layer2", "conv_b", "q_proj", "self_attn", "LayerNorm", "ln_1", "wq", "gamma",
               "block3-1", "", "weight", "bias"]


@given(st.lists(st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=6).map(".".join), min_size=1, max_size=25))
def test_name_columns_equal_the_name_functions(names):
    """The table reads each module path once, from its parent's pieces: the same as reading every name whole."""
    table = TensorTable.from_state_dict({n: (1,) for n in names})
    assert table.tokens == tuple(name_tokens(n) for n in table.names)
    assert table.skeletons == tuple(name_skeleton(n) for n in table.names)
    assert table.indices == tuple(name_indices(n) for n in table.names)
    assert table.module_skeletons == tuple(name_skeleton(m) for m in table.modules)
    assert table.signature_keys == tuple(f"{leaf}:1" for leaf in table.leaves)


def test_name_columns_belong_to_their_table():
    a = TensorTable.from_state_dict({"layers.0.wq.weight": (2, 3), "layers.1.wq.weight": (2, 3)})
    b = dataclasses.replace(a, names=("model.layers.0.self_attn.q_proj.weight", "h.1.attn.bias"))
    assert a.tokens[0] == name_tokens("layers.0.wq.weight") and b.tokens[0] == name_tokens(b.names[0])
    assert b.indices == ((0,), (1,)) and b.module_skeletons[1] == name_skeleton("h.1.attn")
    assert a.signature_keys == ("weight:2x3", "weight:2x3") and b.signature_keys == ("weight:2x3", "bias:2x3")
