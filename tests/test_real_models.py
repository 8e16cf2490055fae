"""Real architectures built from configs with random weights (never downloaded)."""

import pytest
import torch

from reference_llama import TransformerDecoder, hf_to_tune_truth
from weight_mapper import WeightMapper, apply_plan

transformers = pytest.importorskip("transformers")

N_LAYERS, VOCAB, DIM, HIDDEN, HEADS, KV_HEADS = 3, 96, 64, 160, 4, 2


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=N_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    tune = TransformerDecoder(VOCAB, DIM, HIDDEN, N_LAYERS, HEADS, KV_HEADS, 1e-6, 10000.0).eval()
    return hf, tune, torch.randint(0, VOCAB, (2, 12))


def max_diff(hf, tune, ids) -> float:
    with torch.no_grad():
        return (hf(ids).logits - tune(ids)).abs().max().item()


def test_ground_truth_is_proved_by_identical_outputs(llama_pair):
    hf, tune, ids = llama_pair
    truth = hf_to_tune_truth(N_LAYERS)
    tune.load_state_dict({truth[k]: v for k, v in hf.state_dict().items()}, strict=True)
    assert max_diff(hf, tune, ids) == 0.0


@pytest.mark.parametrize("use_dummy", [False, True])
def test_best_match_maps_hf_llama_onto_torchtune_names_exactly(llama_pair, use_dummy):
    hf, tune, ids = llama_pair
    mapper = WeightMapper(hf, tune, dummy_input=ids if use_dummy else None)
    assert mapper.suggest_mapping(strategy="best_match") == hf_to_tune_truth(N_LAYERS)
    tune.load_state_dict(apply_plan(mapper.get_plan(), hf.state_dict()), strict=True)
    assert max_diff(hf, tune, ids) == 0.0


def test_optimal_is_at_least_as_right_as_greedy(llama_pair):
    hf, tune, _ = llama_pair
    truth = hf_to_tune_truth(N_LAYERS)
    mapper = WeightMapper(hf, tune)
    correct = {}
    for strategy in ("greedy", "best_match"):
        mapping = mapper.suggest_mapping(strategy=strategy)
        correct[strategy] = sum(truth[k] == v for k, v in mapping.items())
    assert correct["best_match"] == len(truth) >= correct["greedy"]


def test_conservative_never_maps_wrongly(llama_pair):
    hf, tune, _ = llama_pair
    truth = hf_to_tune_truth(N_LAYERS)
    mapping = WeightMapper(hf, tune).suggest_mapping(strategy="conservative")
    assert mapping and all(truth[k] == v for k, v in mapping.items())


def test_meta_device_llama_maps_from_shapes_alone():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=N_LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
        tune = TransformerDecoder(VOCAB, DIM, HIDDEN, N_LAYERS, HEADS, KV_HEADS)
    assert WeightMapper(hf, tune).suggest_mapping() == hf_to_tune_truth(N_LAYERS)


def test_from_safetensors_no_definition_order_wrong_matches_are_flagged(llama_pair, tmp_path):
    """A safetensors header is sorted: without definition order, what stays unsure is flagged."""
    from safetensors.torch import save_file

    hf, tune, _ = llama_pair
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, path)
    truth = hf_to_tune_truth(N_LAYERS)
    mapper = WeightMapper.from_checkpoint(path, tune)
    mapper.suggest_mapping()
    wrong = [e for e in mapper.get_plan().entries if truth[e.source[0]] != e.target]
    assert all(e.ambiguous for e in wrong)
    conservative = mapper.suggest_mapping(strategy="conservative")
    assert conservative and all(truth[k] == v for k, v in conservative.items())
