"""Pack groups: a decoder's q/k/v get one format in the budgeted plan, and the grouped ILP equals a
brute-force search over one shared format per group (random instances and the tiny LLaMA's table)."""

import itertools

import numpy as np
import pytest
import torch

from quantseal.compress.budget import MatrixOptions, solve_allocation
from quantseal.compress.pack_groups import merge_options, pack_groups


def grouped_brute_force(options, groups, budget):
    """Least total error over every assignment in which each group's members take one shared
    label (and every other matrix any of its candidates), bytes ≤ budget."""
    index = {o.name: i for i, o in enumerate(options)}
    grouped = {n for g in groups for n in g}
    units = [[index[n] for n in g] for g in groups] + [[i] for i, o in enumerate(options) if o.name not in grouped]
    unit_labels = []
    for u in units:
        labels = [lab for lab in options[u[0]].labels if all(lab in options[i].labels for i in u)]
        unit_labels.append(labels)
    best = (float("inf"), None)
    for combo in itertools.product(*unit_labels):
        choice = [0] * len(options)
        for u, lab in zip(units, combo):
            for i in u:
                choice[i] = options[i].labels.index(lab)
        if sum(o.bytes[c] for o, c in zip(options, choice)) <= budget:
            err = sum(o.errors[c] for o, c in zip(options, choice))
            if err < best[0]:
                best = (err, choice)
    return best


def test_pack_groups_are_each_attentions_qkv():
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")]
    assert pack_groups(names) == [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)]
    assert pack_groups(["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"]) == []  # Phi-3
    assert pack_groups(["a.q_proj", "a.k_proj"]) == []  # no v: nothing the export packs


def test_merge_sums_shared_labels_and_expands_back():
    opts = [MatrixOptions("q", ["i4", "i8", "f16"], [10, 20, 40], [3.0, 1.0, 0.0], [1.0, 2.0, 4.0]),
            MatrixOptions("o", ["i4", "i8"], [5, 9], [2.0, 1.0], [0.5, 0.9]),
            MatrixOptions("k", ["i8", "i4"], [8, 4], [0.5, 1.5], [0.8, 0.4])]
    merged, expand = merge_options(opts, [["q", "k"]])
    assert [m.name for m in merged] == ["q+k", "o"]
    assert merged[0].labels == ["i4", "i8"]  # f16 is not a candidate of k
    assert merged[0].bytes == [14, 28] and merged[0].errors == [4.5, 1.5] and merged[0].costs == [1.4, 2.8]
    assert expand([1, 0]) == [1, 0, 0] and expand([0, 1]) == [0, 1, 1]
    with pytest.raises(ValueError):
        merge_options(opts, [["q", "nope"]])
    with pytest.raises(ValueError):
        merge_options(opts, [["q", "k"], ["k", "o"]])


@pytest.mark.parametrize("seed", range(20))
def test_grouped_ilp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = [f"c{j}" for j in range(int(rng.integers(2, 4)))]
    opts = []
    for i in range(int(rng.integers(4, 7))):
        b = rng.integers(10, 200, len(labels)).tolist()
        e = (1000.0 / np.asarray(b) * rng.uniform(0.5, 1.5, len(labels))).tolist()
        opts.append(MatrixOptions(f"m{i}", labels, b, e))
    names = [o.name for o in opts]
    groups = [names[:3]] + ([names[3:5]] if len(names) >= 6 else [])
    budget = int(rng.integers(sum(min(o.bytes) for o in opts), sum(max(o.bytes) for o in opts) + 1))
    # the grouped floor may exceed the per-matrix floor: lift the budget to the grouped one
    merged, expand = merge_options(opts, groups)
    budget = max(budget, sum(min(m.bytes) for m in merged))
    choice = expand(solve_allocation(merged, budget))
    for g in groups:
        assert len({opts[names.index(n)].labels[choice[names.index(n)]] for n in g}) == 1
    assert sum(o.bytes[c] for o, c in zip(opts, choice)) <= budget
    err = sum(o.errors[c] for o, c in zip(opts, choice))
    assert err == pytest.approx(grouped_brute_force(opts, groups, budget)[0], rel=1e-9)


BUDGET_MB = 1.42  # as tests/compress/test_calibrated_plan.py: int4 and int8 both occur


@pytest.fixture(scope="module")
def llama_table(tiny_llama_dir):
    from quantseal.compress.calibrated_plan import candidate_table

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return candidate_table(tiny_llama_dir, BUDGET_MB, ("int4_b32", "int8_b32"), calib_samples=16)
    finally:
        torch.set_num_threads(threads)


def test_tiny_llama_plan_gives_qkv_one_format_and_equals_brute_force(llama_table, tiny_llama_dir):
    from quantseal.compress.calibrated_plan import plan_formats
    from quantseal.compress.pack_groups import grouped_plan

    table = llama_table
    choice, groups = grouped_plan(table, budget_mb=BUDGET_MB)
    assert groups == [[f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)]
    labels = {o.name: o.labels[c] for o, c in zip(table.options, choice)}
    for g in groups:
        assert len({labels[n] for n in g}) == 1, {n: labels[n] for n in g}
    linear = {lab for n, lab in labels.items() if table.targets[n][1] == "linear"}
    assert linear == {"int4_b32", "int8_b32"}  # the budget is tight: both formats occur
    budget = table.budget_bytes(budget_mb=BUDGET_MB)
    assert sum(o.bytes[c] for o, c in zip(table.options, choice)) <= budget
    err = sum(o.errors[c] for o, c in zip(table.options, choice))
    best, _ = grouped_brute_force(table.options, groups, budget)  # 2^10 · (table formats) assignments
    assert err == pytest.approx(best, rel=1e-9)
    # the per-matrix optimum is no worse (grouping is a constraint), and plan_formats is this plan
    free = solve_allocation(table.options, budget)
    assert sum(o.errors[c] for o, c in zip(table.options, free)) <= err * (1 + 1e-9)
    fplan = plan_formats(tiny_llama_dir, BUDGET_MB, ("int4_b32", "int8_b32"), calib_samples=16)
    assert {n: f.name for n, f in fplan.formats.items()} == labels and fplan.groups == groups


def test_rtn_budget_mb_plan_packs_qkv(llama_mb_export):
    """``compress --method rtn --budget-mb`` on a decoder (rank-0 candidates) plans per pack group
    too: each layer's q/k/v share a format, and the export packs them into one kernel."""
    from quantseal.checkpoint import read_checkpoint

    ck, report = llama_mb_export
    manifest, _ = read_checkpoint(ck)
    for i in range(2):
        formats = {manifest.matrices[f"model.layers.{i}.self_attn.{p}_proj"].format for p in "qkv"}
        assert len(formats) == 1, formats
    n_int = sum(1 for i in range(2)
                if manifest.matrices[f"model.layers.{i}.self_attn.q_proj"].format.startswith("int"))
    per_layer = {i: sum(manifest.matrices[f"model.layers.{i}.{m}"].format.startswith("int")
                        for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
                 for i in range(2)}
    table_int = manifest.matrices["model.embed_tokens"].format.startswith("int")
    assert report["ops"]["MatMulNBits"] == n_int + sum(per_layer.values()) + table_int
