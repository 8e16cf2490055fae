"""Mine the field's renamings from the conversion tables that ship in installed packages.

Writes ``weight_mapper/data/vocabulary.json``: the hand-written vocabulary kept in
``tools/vocabulary_curated.json`` (token synonyms, ordinal families, each with its source)
plus the *component* renamings (``attention_norm`` -> ``sa_norm``, ``wq`` -> ``q_proj``) and
*token* renamings (``attn`` -> ``attention``) that maintainers wrote into their converters:

- torchtune: the ``_FROM_HF`` / ``_FROM_META`` dicts of ``torchtune.models.*`` (read as data);
- transformers 5: ``conversion_mapping._build_checkpoint_conversion_mapping()``, every
  ``WeightRenaming`` / ``WeightConverter``'s source and target patterns (read as data);
- timm: the string pairs of ``checkpoint_filter_fn`` / ``_convert_*`` / ``*remap*`` functions
  of ``timm.models.*``: ``k.replace('a', 'b')``, ``re.sub(r'a', r'b', k)`` and lists of
  ``('a', 'b')`` swaps, read from the source with ``ast`` (nothing is executed or copied).

Each pair is reduced to the one dotted component (or word) in which its two sides differ
(``layers.{}.attention_norm.weight`` vs ``layers.{}.sa_norm.scale`` -> ``attention_norm`` ~
``sa_norm``) and recorded with the package, version and table it came from. Components that
one table lists side by side in the same slot (``q_proj``, ``k_proj``, ``v_proj``) are recorded
as *distinct*: the name model never makes them synonyms, however the pairs chain.

Run it in an environment that has the packages (the benchmark venv)::

    /work/benchenv/bin/python tools/mine_vocabulary.py
"""

from __future__ import annotations

import ast
import difflib
import importlib
import json
import pkgutil
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weight_mapper.names import _raw_tokens  # noqa: E402  (the tokeniser the matcher uses)

CURATED = ROOT / "tools" / "vocabulary_curated.json"
OUT = ROOT / "weight_mapper" / "data" / "vocabulary.json"
# A component that is a parameter or buffer leaf says nothing about module naming.
_LEAVES = {"weight", "bias", "scale", "gamma", "beta", "running_mean", "running_var", "num_batches_tracked",
           "inv_freq", "kernel"}
_SLOT = "#"  # a numbered position (``{}``, ``(\d+)``, ``\1``)


def _clean(pattern: str) -> str | None:
    """A regex or template key as a plain dotted name with ``#`` for numbered slots, or None."""
    text = pattern.strip()
    text = re.sub(r"\(\?[=!<][^)]*\)", "", text)  # lookarounds
    text = text.replace("{}", _SLOT)
    text = re.sub(r"\(\\d\+\)|\\d\+|\\\d|\[0-9\]\+|\(\[0-9\]\+\)|\(\.\*\?\)|\(\.\+\?\)", _SLOT, text)
    text = text.replace(r"\.", ".").strip("^$")
    if re.search(r"[\\()\[\]|?*+{}^$]", text):
        return None
    return text


def _components(name: str) -> list[str]:
    return [c for c in name.split(".") if c]


def _diff(a: str, b: str) -> list[tuple[list[str], list[str], str]]:
    """The runs of components in which two dotted names differ, each with its context.

    Components are aligned like lines of a diff (``difflib``), so that a prefix added on one
    side (``model.``) does not shift the rest: ``model.layers.#.mlp.down_proj.weight`` vs
    ``layers.#.mlp.w2.weight`` differ in ``down_proj`` / ``w2``, context ``layers.#.mlp.*.weight``.
    """
    ca, cb = _components(a), _components(b)
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ca, cb, autojunk=False).get_opcodes():
        if tag == "replace":
            out.append((ca[i1:i2], cb[j1:j2], ".".join(ca[:i1] + ["*"] + ca[i2:])))
    return out


def _useful(component: str) -> bool:
    return bool(re.search("[a-zA-Z]", component)) and component.lower() not in _LEAVES and _SLOT not in component


class Miner:
    def __init__(self):
        self.components: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.tokens: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.distinct: dict[tuple[str, str], set[str]] = defaultdict(set)  # (source, context) -> components

    def add(self, left: str, right: str, source: str) -> None:
        a, b = _clean(left), _clean(right)
        if not a or not b or a == b:
            return
        for ra, rb, context in _diff(a, b):
            if len(ra) == len(rb) == 1:
                self.distinct[(source, "L:" + context)].add(ra[0].lower())
                self.distinct[(source, "R:" + context)].add(rb[0].lower())
            if len(ra) == len(rb) <= 3:
                self._pairs(ra, rb, source)

    def _pairs(self, ra: list[str], rb: list[str], source: str) -> None:
        for x, y in zip(ra, rb):
            if x == y or not (_useful(x) and _useful(y)):
                continue
            x, y = x.lower(), y.lower()
            self.components[tuple(sorted((x, y)))].add(source)
            tx, ty = _raw_tokens(x), _raw_tokens(y)
            while tx and ty and tx[0] == ty[0]:
                tx, ty = tx[1:], ty[1:]
            while tx and ty and tx[-1] == ty[-1]:
                tx, ty = tx[:-1], ty[:-1]
            if len(tx) == len(ty) == 1 and not tx[0].isdecimal() and not ty[0].isdecimal():
                self.tokens[tuple(sorted((tx[0], ty[0])))].add(source)


def mine_torchtune(miner: Miner) -> str:
    import torchtune
    import torchtune.models as models

    names = ["torchtune.models.convert_weights"] + [
        f"torchtune.models.{m.name}._convert_weights" for m in pkgutil.iter_modules(models.__path__) if m.ispkg]
    for mod_name in names:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # a model package without a converter, or one that needs extras
            continue
        for attr, table in vars(mod).items():
            if not (attr.startswith("_") and "FROM_" in attr and isinstance(table, dict)):
                continue
            source = f"torchtune {torchtune.__version__} {mod_name}.{attr}"
            for left, right in table.items():
                if isinstance(left, str) and isinstance(right, str):
                    miner.add(left, right, source)
    return f"torchtune {torchtune.__version__}"


def mine_transformers(miner: Miner) -> str:
    import transformers
    from transformers import conversion_mapping

    mapping = conversion_mapping._build_checkpoint_conversion_mapping()
    for model_type, converters in mapping.items():
        source = f"transformers {transformers.__version__} conversion_mapping[{model_type!r}]"
        for conv in converters:
            left = getattr(conv, "source_patterns", None)
            right = getattr(conv, "target_patterns", None)
            left = [left] if isinstance(left, str) else list(left or [])
            right = [right] if isinstance(right, str) else list(right or [])
            if len(left) == len(right):
                for a, b in zip(left, right):
                    if isinstance(a, str) and isinstance(b, str):
                        miner.add(a, b, source)
    return f"transformers {transformers.__version__}"


def _str_pair(nodes) -> tuple[str, str] | None:
    if len(nodes) >= 2 and all(isinstance(n, ast.Constant) and isinstance(n.value, str) for n in nodes[:2]):
        return nodes[0].value, nodes[1].value
    return None


def mine_timm(miner: Miner) -> str:
    import timm
    import timm.models as models

    folder = Path(models.__file__).parent
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            if not any(w in fn.name for w in ("filter_fn", "_convert", "remap")):
                continue
            source = f"timm {timm.__version__} timm.models.{path.stem}.{fn.name}"
            for node in ast.walk(fn):
                pair = None
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    if node.func.attr == "replace":
                        pair = _str_pair(node.args)
                    elif node.func.attr == "sub" and isinstance(node.func.value, ast.Name) and node.func.value.id == "re":
                        pair = _str_pair(node.args)
                elif isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) >= 2 and all(
                        isinstance(e, ast.Tuple) and len(e.elts) == 2 and _str_pair(e.elts) for e in node.elts):
                    for e in node.elts:
                        miner.add(*_str_pair(e.elts), source)
                if pair:
                    miner.add(*pair, source)
    return f"timm {timm.__version__}"


def main() -> None:
    miner = Miner()
    packages = [mine(miner) for mine in (mine_torchtune, mine_transformers, mine_timm)]
    curated = json.loads(CURATED.read_text(encoding="utf-8"))
    distinct = sorted({tuple(sorted(v)) for v in miner.distinct.values() if len(v) > 1})
    out = {
        "format": "weight_mapper.vocabulary",
        "version": 1,
        "about": ("Names the field uses for the same thing. 'token_synonyms' and 'ordinals' are written by hand "
                  "(tools/vocabulary_curated.json, each group with its source); 'components', 'tokens' and "
                  "'distinct' are mined by tools/mine_vocabulary.py from the converters of: " + ", ".join(packages)),
        "token_synonyms": curated["token_synonyms"],
        "component_synonyms": curated.get("component_synonyms", []),
        "ordinals": curated["ordinals"],
        "mined_components": [{"pair": list(k), "sources": sorted(v)} for k, v in sorted(miner.components.items())],
        "mined_tokens": [{"pair": list(k), "sources": sorted(v)} for k, v in sorted(miner.tokens.items())],
        "distinct": [list(d) for d in distinct],
        "contested": curated.get("contested", []),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(out['mined_components'])} component pairs, {len(out['mined_tokens'])} token pairs, "
          f"{len(distinct)} distinct sets from {', '.join(packages)}")


if __name__ == "__main__":
    main()
