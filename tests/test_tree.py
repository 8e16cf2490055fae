from fixture_models import BatchNormed, OldModel
from weight_mapper.table import TensorTable
from weight_mapper.tree import GroupTable, ModuleTree


def test_tree_has_every_module_path_in_definition_order():
    tree = ModuleTree(TensorTable.from_module(OldModel()))
    assert tree.paths == ("", "backbone", "backbone.0", "backbone.2", "classifier", "classifier.0", "classifier.2")
    assert list(tree.graph.successors("backbone")) == ["backbone.0", "backbone.2"]
    assert tree.sibling_pos[tree.path2id["backbone.2"]] == 1.0
    assert tree.parent_id[tree.path2id["classifier.0"]] == tree.path2id["classifier"]


def test_ancestor_ids_stop_at_the_root():
    tree = ModuleTree(TensorTable.from_module(OldModel()))
    ids = tree.ancestor_ids([tree.path2id["backbone.0"]], 4)
    assert [tree.paths[i] for i in ids[0]] == ["backbone.0", "backbone", "", ""]


def test_groups_and_signatures():
    table = TensorTable.from_module(BatchNormed())
    groups = GroupTable.from_table(table, ModuleTree(table))
    assert groups.paths == ("conv1", "bn1", "conv2", "bn2", "fc")
    assert groups.signatures[1] == "bias:8|num_batches_tracked:|running_mean:8|running_var:8|weight:8"
    assert groups.signatures[1] == groups.signatures[3]
    assert groups.members[4].tolist() == [table.name2row["fc.weight"], table.name2row["fc.bias"]]


def test_repeat_ranks_count_repeated_siblings_only():
    names = [f"trunk_output.block{s}.block{s}-{b}.f.{leaf}.0.weight" for s in (1, 2) for b in (0, 1) for leaf in "ac"]
    names += [f"s{s}.b{b}.conv{k}.conv.weight" for s in (1, 2) for b in (1, 2) for k in (1, 3)]
    tree = ModuleTree(TensorTable.from_state_dict({n: (1,) for n in names}))
    ranks = dict(zip(tree.paths, tree.repeat_ranks))
    # stage, block; f.a and f.c have different names, and the lone "0" under each repeats nothing
    assert ranks["trunk_output.block2.block2-1.f.c.0"] == (1, 1)
    assert ranks["s2.b2.conv3.conv"] == (1, 1, 1)  # conv1 / conv3 repeat: rank 1
    assert ranks["trunk_output"] == ranks[""] == ()


def test_ordinal_rank_reads_bare_letters_and_reaches_one_level_down():
    names = [f"blk.f.{leaf}.{k}.weight" for leaf in "abc" for k in (0, 1)] + ["blk.proj.0.weight"]
    names += [f"b1.conv{k}.{part}.weight" for k in (1, 2, 3) for part in ("conv", "bn")] + ["b1.downsample.conv.weight"]
    tree = ModuleTree(TensorTable.from_state_dict({n: (1,) for n in names}))
    rank = dict(zip(tree.paths, tree.ordinal_rank.tolist()))
    # pycls' f.a / f.b / f.c are a series like conv1..conv3; their conv and norm inherit its rank
    assert [rank[f"blk.f.{leaf}"] for leaf in "abc"] == [0.0, 0.5, 1.0]
    assert rank["blk.f.a.0"] == rank["blk.f.a.1"] == rank["b1.conv1.conv"] == rank["b1.conv1.bn"] == 0.0
    assert rank["blk.f.c.0"] == rank["b1.conv3.bn"] == 1.0
    # outside any series, one level up too: no rank
    for path in ("blk.proj.0", "b1.downsample.conv", "blk.f", "blk"):
        assert rank[path] != rank[path]  # NaN


def test_a_lone_word_of_a_two_word_family_ranks_by_itself():
    names = ["visual.ln_pre.weight", "visual.ln_post.weight", "norm_pre.weight", "norm.weight",
             "head.conv_a.weight", "head.conv.weight", "attn.out_proj.weight"]
    tree = ModuleTree(TensorTable.from_state_dict({n: (1,) for n in names}))
    rank = dict(zip(tree.paths, tree.ordinal_rank.tolist()))
    assert rank["visual.ln_pre"] == 0.0 and rank["visual.ln_post"] == 1.0  # a series
    assert rank["norm_pre"] == 0.0  # alone, "pre" still says first (CLIP's ln_pre -> timm's norm_pre)
    assert rank["attn.out_proj"] == 1.0  # "in" / "out" are a pair too
    for path in ("norm", "head.conv_a", "head.conv"):  # a lone "a" says nothing; no word, no rank
        assert rank[path] != rank[path]


def test_a_tables_tree_is_built_once():
    table, other = TensorTable.from_module(OldModel()), TensorTable.from_module(OldModel())
    tree = ModuleTree.of(table)
    assert ModuleTree.of(table) is tree and ModuleTree.of(other) is not tree
    assert ModuleTree.of(other).paths == tree.paths
