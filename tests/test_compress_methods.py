"""The methods of ``padmoe compress`` beyond plain IMP (issue 23), on test_compress's tiny random Mixtral folder:
the Fisher-weighted base, expert alignment, per-expert masks under a byte budget, router-recalibrating healing (KD,
router, held-out selection), the REAP baseline, byte accounting and ``--target-bytes-ratio``; and every flag
combination that makes no sense is one line, exit 2, nothing written."""

import json
import os
import shutil
import struct

import pytest
import torch
from test_compress import E, folders, run  # noqa: F401 - the tiny Mixtral folder (4 experts, 2 layers) and its runner

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))


def _source(folders):  # noqa: F811
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folders / "mixtral", dtype=torch.float32).eval()


def _batches(folders, count=3):  # noqa: F811
    from pad_moe.hfmoe.compress import _blocks, rank_batches
    from pad_moe.lm.tokenizer import model_tokenizer

    blocks = _blocks(model_tokenizer(str(folders / "mixtral")), str(folders / "calib.txt"), "--calib", 32)
    return blocks, rank_batches(blocks, 0, 1, 4, count)


def _variant(folders, root, edit):  # noqa: F811
    """A copy of the fixture folder (text included) whose model ``edit(model)`` changed."""
    shutil.copytree(folders, root, ignore=shutil.ignore_patterns("mixtral"))
    model = _source(folders)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(root / "mixtral")
    for name in os.listdir(folders / "mixtral"):
        if name.startswith(("tokenizer", "special")):
            shutil.copy(folders / "mixtral" / name, root / "mixtral")
    return root


def _disk_tensor_bytes(folder) -> int:
    """Bytes of the safetensors files of ``folder`` less their headers (8-byte length + JSON)."""
    total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                header = struct.unpack("<Q", f.read(8))[0]
            total += os.path.getsize(path) - 8 - header
    return total


def _meta(folder) -> dict:
    return json.loads((folder / "pad_deploy.json").read_text())


# -- --static-init fisher -------------------------------------------------------------------------------------------

def test_fisher_weights_are_frequency_times_fisher_normalised_and_fall_back_where_zero():
    from pad_moe.hfmoe.experts import fisher_weights

    freq = torch.tensor([3.0, 1.0])
    fisher = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    w = fisher_weights(freq, fisher)
    expected = torch.tensor([[0.5, 0.75, 1.0], [0.5, 0.25, 0.0]], dtype=torch.float64)  # entry 1: no mass -> freq
    assert torch.allclose(w, expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="squared gradients"):
        fisher_weights(freq, -fisher)


def test_fisher_base_is_the_hand_computed_weighted_mean(folders):  # noqa: F811
    from pad_moe.hfmoe.calibration import all_reduced_frequency, expert_fisher
    from pad_moe.hfmoe.compress import lm_loss
    from pad_moe.hfmoe.experts import import_hf_moe, moe_blocks

    _, batches = _batches(folders)
    model = _source(folders)
    freq = all_reduced_frequency(model, batches)
    fisher = expert_fisher(model, batches, lm_loss)
    # by hand: .backward() of every batch on a fresh copy, squared gradients summed
    hand = _source(folders)
    squares = {name: [torch.zeros_like(b.experts.gate_up_proj, dtype=torch.float64),
                      torch.zeros_like(b.experts.down_proj, dtype=torch.float64)] for name, b in moe_blocks(hand)}
    for batch in batches:
        hand.zero_grad()
        lm_loss(hand, batch).backward()
        for name, b in moe_blocks(hand):
            squares[name][0] += b.experts.gate_up_proj.grad.double() ** 2
            squares[name][1] += b.experts.down_proj.grad.double() ** 2
    weights = {name: [b.experts.gate_up_proj.detach().double(), b.experts.down_proj.detach().double()]
               for name, b in moe_blocks(hand)}
    import_hf_moe(model, static_init="fisher", expert_frequency=freq, expert_fisher=fisher)
    for name, block in moe_blocks(model):
        f = freq[name].double() / freq[name].sum()
        for square, w, static in zip(squares[name], weights[name],
                                     (block.experts.static_gate_up, block.experts.static_down), strict=True):
            mass = f.view(-1, 1, 1) * square / len(batches)
            expected = (mass * w).sum(0) / mass.sum(0)
            assert bool((mass.sum(0) > 0).all())
            assert torch.allclose(static.double(), expected, rtol=1e-6, atol=1e-9)
            assert not torch.allclose(static.double(), (f.view(-1, 1, 1) * w).sum(0), rtol=1e-3)  # not frequency's


def test_kappa_one_is_exact_with_fisher(folders, tmp_path):  # noqa: F811
    import pad_moe

    summary = run(folders, tmp_path / "f", kappa=1.0, static_init="fisher")
    assert summary["verified_max_abs_diff"] == 0
    assert torch.equal(pad_moe.load_deployed(str(tmp_path / "f"))(IDS).logits, _source(folders)(IDS).logits)
    assert _meta(tmp_path / "f")["static_init"] == "fisher"


# -- --align --------------------------------------------------------------------------------------------------------

def test_align_keeps_the_function_and_recovers_permuted_copies(folders):  # noqa: F811
    from pad_moe.hfmoe.align import align_experts, mean_similarity
    from pad_moe.hfmoe.experts import moe_blocks

    model = _source(folders)
    with torch.no_grad():
        before = model(IDS).logits
    report = align_experts(model, {name: 0 for name, _ in moe_blocks(model)})  # random experts: function kept
    with torch.no_grad():
        assert (model(IDS).logits - before).abs().max() <= 1e-5
    assert all(r["similarity_after"] >= r["similarity_before"] for r in report.values())
    g = torch.Generator().manual_seed(5)
    copies = _source(folders)
    with torch.no_grad():  # every expert a permuted copy of expert 1 (the reference), unit order shuffled
        for _, block in moe_blocks(copies):
            x = block.experts
            F = x.down_proj.shape[-1]
            for k in range(E):
                perm = torch.randperm(F, generator=g)
                x.gate_up_proj[k] = torch.cat([x.gate_up_proj[1, :F][perm], x.gate_up_proj[1, F:][perm]])
                x.down_proj[k] = x.down_proj[1][:, perm]
            x.gate_up_proj[1] = x.gate_up_proj[1]  # the reference stays itself
        before = copies(IDS).logits
    report = align_experts(copies, {name: 1 for name, _ in moe_blocks(copies)})
    for name, block in moe_blocks(copies):
        x = block.experts
        assert report[name]["similarity_before"] < 0.5 and report[name]["similarity_after"] == pytest.approx(1.0)
        assert all(torch.equal(x.gate_up_proj[k], x.gate_up_proj[1]) and torch.equal(x.down_proj[k], x.down_proj[1])
                   for k in range(E))  # the permutation recovered exactly
        assert mean_similarity(x.gate_up_proj, x.down_proj) == pytest.approx(1.0)
    with torch.no_grad():
        assert (copies(IDS).logits - before).abs().max() <= 1e-5


def test_kappa_one_with_align_is_exact(folders, tmp_path):  # noqa: F811
    import pad_moe

    summary = run(folders, tmp_path / "a", kappa=1.0, align=True, static_init="frequency")
    assert summary["verified_max_abs_diff"] == 0  # the written model is the aligned one, exactly
    loaded = pad_moe.load_deployed(str(tmp_path / "a"))
    assert (loaded(IDS).logits - _source(folders)(IDS).logits).abs().max() <= 1e-5
    meta = _meta(tmp_path / "a")
    assert set(meta["align"]) == set(meta["blocks"]) and all(0 <= r["reference"] < E for r in meta["align"].values())


def test_align_refuses_experts_that_are_not_gated():
    from torch import nn

    from pad_moe.hfmoe.align import check_gated
    from pad_moe.hfmoe.families.layouts import layout_named

    dense = nn.Module()
    dense.fc1 = nn.Linear(4, 8)
    with pytest.raises(ValueError, match="drop --align") as err:
        check_gated("model.layers.0.mlp", dense, layout_named("concatenated"))
    assert len(str(err.value).splitlines()) == 1


# -- --mask-sharing expert ------------------------------------------------------------------------------------------

def _per_expert_pad_model(folders, granularity):  # noqa: F811
    from pad_moe.hfmoe.experts import import_hf_moe, moe_blocks

    model = import_hf_moe(_source(folders), granularity=granularity, mask_sharing="expert")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, block in moe_blocks(model):
            x = block.experts
            x.static_gate_up.normal_(0, 0.3, generator=g)
            x.set_masks({k: torch.rand(v.shape, generator=g) < (0.2 + 0.15 * int(k[1])) for k, v in x.masks().items()})
            x.phi.fill_(0.3)
    return model.eval()


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_per_expert_masks_export_reload_and_count(folders, tmp_path, capsys, granularity):  # noqa: F811
    import pad_moe
    from pad_moe.accounting import count_live
    from pad_moe.deploy.count import count_main
    from pad_moe.hfmoe.budget import live_pad_bytes
    from pad_moe.hfmoe.deployed import save_compressed

    model = _per_expert_pad_model(folders, granularity)
    with torch.no_grad():
        expected = model(IDS).logits
    folder = tmp_path / "m"
    folder.mkdir()
    meta = save_compressed(model, None, str(folder), {"family": "mixtral", "method": "random",
                                                      "granularity": granularity})
    spec = next(iter(meta["blocks"].values()))
    assert spec["mask_sharing"] == "expert" and len(set(spec["dynamic_counts"]["gate"])) > 1  # counts differ
    assert count_live(model)["params_compact"] == meta["params_stored"]
    assert meta["bytes_stored"] == live_pad_bytes(model) == _disk_tensor_bytes(folder)
    for form in ("auto", "full", "compact"):
        loaded = pad_moe.load_deployed(str(folder), resident=form)
        assert (loaded(IDS).logits - expected).abs().max() <= 1e-5, form
    with pytest.raises(ValueError, match="per-expert masks") as err:
        pad_moe.load_deployed(str(folder), resident="narrow")
    assert len(str(err.value).splitlines()) == 1
    assert count_main([str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == meta["params_stored"]


def _rare_expert(model, rare=2):
    """Expert ``rare`` of every block (almost) never routed: the embeddings share a strong direction d that every
    router input keeps, and its router row is −d."""
    from pad_moe.hfmoe.experts import moe_blocks

    d = torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(4)),
                                      dim=0)
    model.model.embed_tokens.weight += 2 * d
    for _, block in moe_blocks(model):
        w = block.gate.weight
        w -= torch.outer(w @ d, d)  # the other experts routed by what differs between tokens
        w *= 20
        w[rare] = -50 * d


def test_per_expert_masks_spend_the_byte_budget_of_kappa_where_the_router_sends_tokens(folders, tmp_path):  # noqa: F811
    from pad_moe.hfmoe.budget import ByteModel, layer_pad_bytes
    from pad_moe.hfmoe.calibration import all_reduced_frequency

    src = _variant(folders, tmp_path / "src", _rare_expert)
    summary = run(src, tmp_path / "x", kappa=0.5, mask_sharing="expert")
    budget = layer_pad_bytes(ByteModel(_source(src)), 0.5, "element")
    assert 0.995 * budget <= summary["bytes_stored"] <= budget  # the bytes of layer-shared PAD at κ = 0.5
    assert summary["budget"]["attempts"][-1]["bytes"] == summary["bytes_stored"]
    meta = _meta(tmp_path / "x")
    assert meta["mask_sharing"] == "expert"
    _, batches = _batches(src)
    freq = all_reduced_frequency(_source(src), batches)
    for name, spec in meta["blocks"].items():
        assert int(freq[name][2]) <= 0.01 * int(freq[name].sum())
        counts = [sum(spec["dynamic_counts"][p][k] for p in ("gate", "up", "down")) for k in range(E)]
        assert counts[2] < 0.1 * min(counts[k] for k in range(E) if k != 2), (counts, freq)  # the rare one ~none


# -- healing ----------------------------------------------------------------------------------------------------------

def test_kd_healing_lowers_the_kl_and_keeps_the_router_unless_asked(folders, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    source = {k: v for k, v in _source(folders).state_dict().items() if k.endswith("gate.weight")}
    kd = run(folders, tmp_path / "kd", kappa=0.3, heal_steps=10, heal_lr=3e-2, calib_batches=1, heal_loss="kd",
             heal_select=3)
    losses = kd["heal"]["losses"]
    assert kd["heal"]["loss"] == "kd" and losses[-1] < losses[0] and kd["heal"]["final_loss"] < losses[0]
    curve = _meta(tmp_path / "kd")["heal"]["held_out"]
    assert [step for step, _ in curve] == [0, 3, 6, 9, 10]  # before healing, every 3 steps, after the last
    best = _meta(tmp_path / "kd")["heal"]["best_step"]
    assert curve[[s for s, _ in curve].index(best)][1] == min(v for _, v in curve)
    written = load_file(tmp_path / "kd" / "model.safetensors")
    assert all(torch.equal(written[k], v) for k, v in source.items())  # the router frozen
    router = run(folders, tmp_path / "r", kappa=0.3, heal_steps=4, heal_lr=3e-2, calib_batches=1, heal_loss="kd",
                 heal_router=True)
    written = load_file(tmp_path / "r" / "model.safetensors")
    assert all(not torch.equal(written[k], v) for k, v in source.items())  # every router trained
    assert router["heal"]["router"] and _meta(tmp_path / "r")["heal"]["router"]


def test_the_held_out_slice_is_disjoint_from_the_healing_batches(folders):  # noqa: F811
    from pad_moe.hfmoe.compress import rank_batches
    from pad_moe.hfmoe.healing import all_batches, split_held_out

    blocks, _ = _batches(folders)
    calib, held = split_held_out(blocks)
    assert len(held) == -(-len(blocks) // 10) and len(calib) + len(held) == len(blocks)
    held_rows = {tuple(b["input_ids"][i].tolist()) for b in all_batches(held, 4) for i in range(len(b["input_ids"]))}
    for world in (1, 2):
        for rank in range(world):
            for batch in rank_batches(calib, rank, world, 4, 3 * len(calib)):  # cycling through all the blocks
                assert not {tuple(r.tolist()) for r in batch["input_ids"]} & held_rows


# -- REAP, bytes, --target-bytes-ratio ---------------------------------------------------------------------------------

def test_reap_keeps_the_salient_expert_that_drop_discards(folders, tmp_path):  # noqa: F811
    from pad_moe.hfmoe.calibration import all_reduced_frequency
    from pad_moe.hfmoe.experts import moe_blocks

    _, batches = _batches(folders)
    model = _source(folders)
    first = moe_blocks(model)[0][0]
    rare = int(all_reduced_frequency(model, batches)[first].argmin())

    def louder(m):  # its outputs ×10; the first layer's routing unchanged
        moe_blocks(m)[0][1].experts.down_proj[rare] *= 10

    src = _variant(folders, tmp_path / "src", louder)
    reap = run(src, tmp_path / "reap", method="reap", kappa=0.34)  # keeps 2 of 4
    drop = run(src, tmp_path / "drop", method="drop", kappa=0.34)
    assert rare in reap["kept_experts"][first] and rare not in drop["kept_experts"][first]
    assert len(reap["kept_experts"][first]) == 2
    for out in ("reap", "drop"):
        meta = _meta(tmp_path / out)
        assert meta["bytes_stored"] == _disk_tensor_bytes(tmp_path / out) == 4 * meta["params_stored"]


def test_bytes_stored_is_the_bytes_on_disk_and_target_ratios_are_met(folders, tmp_path):  # noqa: F811
    for name, kwargs in (("imp", {}), ("drop", {"method": "drop"}), ("merge", {"method": "merge"}),
                         ("expert", {"mask_sharing": "expert"})):
        ratio = 0.84 if name == "drop" else 0.6
        if name == "merge":
            ratio = run(folders, tmp_path / "m0", method="merge")["bytes_ratio"] * 1.01
        summary = run(folders, tmp_path / name, target_bytes_ratio=ratio, iterations=1, **kwargs)
        meta = _meta(tmp_path / name)
        assert meta["bytes_stored"] == summary["bytes_stored"] == _disk_tensor_bytes(tmp_path / name)
        assert abs(summary["bytes_stored"] / summary["bytes_source"] - ratio) <= 0.02 * ratio, name
        assert meta["target_bytes_ratio"] == ratio and summary["bytes_source"] == 4 * summary["params_original"]


# -- flags that make no sense ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--method", "drop", "--kappa", "0.5", "--align"], "drop --align"),
    (["--method", "reap", "--kappa", "0.5", "--align"], "drop --align"),
    (["--method", "drop", "--kappa", "0.5", "--static-init", "fisher"], "drop --static-init"),
    (["--method", "reap", "--kappa", "0.5", "--static-init", "fisher"], "drop --static-init"),
    (["--method", "reap", "--kappa", "0.5", "--mask-sharing", "expert"], "drop --mask-sharing"),
    (["--method", "reap", "--kappa", "0.5", "--granularity", "neuron"], "drop --granularity"),
    (["--method", "merge", "--mask-sharing", "expert"], "drop --mask-sharing"),
    (["--kappa", "0.5", "--heal-router"], "--heal-router sets how healing runs"),
    (["--kappa", "0.5", "--heal-loss", "kd"], "--heal-loss sets how healing runs"),
    (["--kappa", "0.5", "--heal-select", "2"], "--heal-select sets how healing runs"),
    (["--kappa", "0.5", "--heal-steps", "2", "--heal-select", "0"], "--heal-select 0 must be an integer >= 1"),
    (["--kappa", "0.5", "--target-bytes-ratio", "0.5"], "drop --kappa"),
    (["--target-bytes-ratio", "-1"], "must be a positive number"),
    (["--target-bytes-ratio", "0.05"], "the nearest reachable ratio is"),
    (["--method", "drop", "--target-bytes-ratio", "0.9"], "the nearest reachable ratio is"),
    (["--method", "merge", "--target-bytes-ratio", "0.8"], "the nearest reachable ratio is"),
    (["--mask-sharing", "expert", "--target-bytes-ratio", "0.35"], "the smallest reachable ratio is"),
    (["--kappa", "0.5", "--static-init", "fisher", "--calib-batches", "1000"], "--static-init fisher averages"),
])
def test_senseless_flag_combinations_are_one_line_exit_2_and_nothing_written(folders, tmp_path, capsys, argv,  # noqa: F811
                                                                               message):
    from pad_moe.hfmoe.compress import compress_main

    out = tmp_path / "out"
    code = compress_main([str(folders / "mixtral"), "--calib", str(folders / "calib.txt"), "--out", str(out),
                          "--seq-len", "32", "--batch-size", "4", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_a_calibration_text_too_small_for_the_held_out_slice_is_one_line(folders, tmp_path, capsys):  # noqa: F811
    from pad_moe.hfmoe.compress import compress_main

    blocks, _ = _batches(folders)
    batch = len(blocks) - -(-len(blocks) // 10) + 1  # one batch of all the blocks, but not of those left to heal on
    out = tmp_path / "out"
    code = compress_main([str(folders / "mixtral"), "--calib", str(folders / "calib.txt"), "--out", str(out),
                          "--seq-len", "32", "--batch-size", str(batch), "--kappa", "0.5", "--heal-steps", "2",
                          "--heal-select", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "after holding out" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# -- two ranks ≡ one process ------------------------------------------------------------------------------------------

def _rank_statistics(rank, world, folders):  # noqa: F811
    from pathlib import Path

    from pad_moe.hfmoe.calibration import all_reduced_frequency, expert_fisher, reap_saliency
    from pad_moe.hfmoe.compress import lm_loss, rank_batches

    blocks, _ = _batches(Path(folders))
    model = _source(Path(folders))
    batches = rank_batches(blocks, rank, world, 2, 3)
    fisher = expert_fisher(model, batches, lm_loss)
    return ({n: c.tolist() for n, c in all_reduced_frequency(model, batches).items()},  # plain lists cross processes
            {n: {k: v.tolist() for k, v in f.items()} for n, f in fisher.items()},
            {n: s.tolist() for n, s in reap_saliency(model, batches).items()})


def test_two_ranks_sum_the_statistics_as_one_process_over_their_batches(folders):  # noqa: F811
    from pad_moe.hfmoe.calibration import all_reduced_frequency, expert_fisher, reap_saliency
    from pad_moe.hfmoe.compress import lm_loss, rank_batches
    from pad_moe.testing.ranks import run_ranks

    ranks = run_ranks(_rank_statistics, 2, str(folders), timeout=300)
    blocks, _ = _batches(folders)
    batches = [b for r in range(2) for b in rank_batches(blocks, r, 2, 2, 3)]  # both ranks' batches, one process
    model = _source(folders)
    freq, fisher, saliency = (all_reduced_frequency(model, batches), expert_fisher(model, batches, lm_loss),
                              reap_saliency(model, batches))
    for rank_freq, rank_fisher, rank_saliency in ranks:
        for name in freq:
            assert rank_freq[name] == freq[name].tolist()
            assert torch.allclose(torch.tensor(rank_saliency[name], dtype=torch.float64), saliency[name], rtol=1e-6,
                                  atol=0)
            for key in ("gate_up_proj", "down_proj"):
                assert torch.allclose(torch.tensor(rank_fisher[name][key], dtype=torch.float64), fisher[name][key],
                                      rtol=1e-5, atol=1e-12)


def _ranked_compress(rank, world, folders, out):  # noqa: F811
    from pathlib import Path

    return run(Path(folders), out, batch_size=2, **_HEALED)


_HEALED = dict(method="random", kappa=0.5, static_init="frequency", align=True, heal_steps=4, heal_lr=1e-2,
               heal_loss="kd", heal_router=True, heal_select=2)  # random masks: the same on any number of ranks


@pytest.mark.slow  # ~35 s on the loaded 2-core machine: two ranks import DeepSpeed and build healing engines
def test_two_ranks_heal_with_kd_router_and_selection_as_one_process(folders, tmp_path):  # noqa: F811
    from pad_moe.testing.ranks import run_ranks

    two = run_ranks(_ranked_compress, 2, str(folders), str(tmp_path / "two"), timeout=300)[0]
    one = run(folders, tmp_path / "one", batch_size=4, **_HEALED)  # the same global batches in one process
    assert two["heal"]["losses"] == pytest.approx(one["heal"]["losses"], rel=1e-4)
    assert [s for s, _ in two["heal"]["held_out"]] == [s for s, _ in one["heal"]["held_out"]] == [0, 2, 4]
    assert [v for _, v in two["heal"]["held_out"]] == pytest.approx([v for _, v in one["heal"]["held_out"]],
                                                                     rel=1e-4)
    assert two["heal"]["best_step"] == one["heal"]["best_step"]
    assert two["align"] == one["align"]
