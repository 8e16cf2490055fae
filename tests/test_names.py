import pytest

from weight_mapper.names import name_indices, name_skeleton, name_tokens, normalise_leaf, semantic_chunks, split_name


def test_split_name():
    assert split_name("a.b.weight") == ("a.b", "weight")
    assert split_name("weight") == ("", "weight")


@pytest.mark.parametrize(("leaf", "canonical"), [("gamma", "weight"), ("beta", "bias"), ("running_mean", "running_mean")])
def test_normalise_leaf(leaf, canonical):
    assert normalise_leaf(leaf) == canonical


def test_tokens_drop_digits_split_camel_case_and_apply_synonyms():
    assert name_tokens("featureExtractor.Conv3.weight") == ("features", "features", "conv", "weight")
    assert name_tokens("encoder.layers.12.attention") == ("encoder", "layer", "attn")


def test_indices_are_positions():
    assert name_indices("layer3.2.conv1.weight") == (3, 2, 1)
    assert name_indices("head.weight") == ()


def test_skeleton_ignores_the_numbers():
    assert name_skeleton("layers.3.mlp") == name_skeleton("layers.13.mlp")


def test_semantic_chunks():
    assert semantic_chunks("yolo_backbone.0") == {"yolo", "backbone"}
