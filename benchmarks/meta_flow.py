"""Zero-config data flow on full-size models: how long recording it on the meta device takes.

Builds transformers models from their published configs under ``torch.device("meta")`` (no
memory for weights) and times :func:`weight_mapper.flow.auto_execution_order`: a synthesised
input (the model's ``dummy_inputs``), every parameter swapped for a meta tensor, one forward
pass followed by a ``TorchFunctionMode``. Also times ``torch.fx`` tracing (which Hugging Face
models fail) and reports the process's peak resident memory.

    /work/benchenv/bin/python -m benchmarks.meta_flow            # every case (8B, 70B, 405B, DeepSeek-V3)
    /work/benchenv/bin/python -m benchmarks.meta_flow --cases llama3_8b
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable

import torch

from benchmarks.runinfo import cpu_model, git_state


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int = 128256) -> Callable:
    def build():
        import transformers

        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                          max_position_embeddings=8192, rope_theta=500000.0)
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(config)
    return build


def _deepseek_v3():
    import transformers

    with torch.device("meta"):
        return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config())


CASES: dict[str, tuple[str, Callable]] = {
    "llama3_8b": ("Llama-3-8B config (32 layers, d=4096, GQA 32/8)", _llama(4096, 14336, 32, 32, 8)),
    "llama3_70b": ("Llama-3-70B config (80 layers, d=8192, GQA 64/8)", _llama(8192, 28672, 80, 64, 8)),
    "llama3_405b": ("Llama-3-405B config (126 layers, d=16384, GQA 128/8)", _llama(16384, 53248, 126, 128, 8)),
    "deepseek_v3": ("DeepSeek-V3 default config (61 layers, 256 routed experts, 671B)", _deepseek_v3),
}


def run(case: str) -> dict:
    from weight_mapper.flow import auto_execution_order, trace_execution_order

    label, build = CASES[case]
    t0 = time.perf_counter()
    model = build()
    built = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(model.state_dict())
    t0 = time.perf_counter()
    traced = trace_execution_order(model)
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    order, how = auto_execution_order(model)
    flow_s = time.perf_counter() - t0
    placed = 0 if order is None else sum(1 for name in model.state_dict() if name in order)
    return {"case": case, "label": label, "params": n_params, "tensors": n_tensors, "build_s": built,
            "fx": "ok" if traced is not None else "fails", "fx_s": trace_s, "how": how, "flow_s": flow_s,
            "placed": placed, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)
    import transformers

    print(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu_model()}, torch threads "
          f"{torch.get_num_threads()}; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; commit {git_state()}.")
    print("Command: `/work/benchenv/bin/python -m benchmarks.meta_flow`\n")
    print("| case | model | parameters | tensors | build on meta s | fx trace | fx s | flow source | flow s "
          "| tensors placed | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        r = run(case)
        print(f"| {r['case']} | {r['label']} | {r['params'] / 1e9:.1f}B | {r['tensors']:,} | {r['build_s']:.1f} | "
              f"{r['fx']} | {r['fx_s']:.2f} | {r['how']} | {r['flow_s']:.2f} | {r['placed']:,}/{r['tensors']:,} | "
              f"{r['peak_rss_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
