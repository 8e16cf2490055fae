"""The screenshots of docs/views.md: Hugging Face Llama -> torchtune's names, in the review page.

    python -m benchmarks.review_page.screenshots docs/img

The source is a tiny Hugging Face ``LlamaForCausalLM`` (random weights) read as a safetensors
file would be (names sorted, so that its order says nothing): its two norms per layer can only
be told apart by their names, and the page flags them. The target is the torchtune-style
reference decoder of the tests, with one extra head no source fills.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks.review_page.cdp import FETCH_HINT, Browser, find_chromium
from benchmarks.review_page.run import screenshots


def llama_mapper():
    import torch
    import transformers

    from weight_mapper import TensorTable, WeightMapper

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from reference_llama import TransformerDecoder

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config)
    source = TensorTable.from_state_dict({k: tuple(v.shape) for k, v in hf.state_dict().items()},
                                         natural_order=True, label="llama.safetensors")
    target = TransformerDecoder(128, 32, 64, 4, 4, 2)
    target.value_head = torch.nn.Linear(32, 1)  # a head the source lacks: unmatched
    mapper = WeightMapper(source, target)
    mapper.suggest_mapping()
    return mapper


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv if argv is not None else sys.argv[1:] or ["docs/img"])[0])
    found = find_chromium()
    if found is None:
        print(f"no headless Chromium: {FETCH_HINT}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        page = llama_mapper().export_review_page(Path(tmp) / "review.html")
        with Browser(found, width=1280, height=720) as browser:
            for shot in screenshots(browser, page, folder):
                print(f"screenshot {shot} ({shot.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
