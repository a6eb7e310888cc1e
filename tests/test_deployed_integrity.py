"""The compact export of a compressed HF MoE (pad_moe.hfmoe.deployed) keeps what it claims and refuses what it is not.

- generation settings: ``padmoe compress`` (PAD and drop) and the causal-LM job's final save keep the source's
  generation config, so ``generate()`` of the loaded model does what the source's did;
- one count: the live PAD model's ``params_compact`` == the export's ``params_stored`` == ``padmoe count`` of the export
  folder == the tensors on disk (φ folded, masks not counted);
- integrity: a copy of a tiny export, edited in tmp_path (a flipped mask byte, value tensors of the wrong shape, fp16
  weights, a NaN, an edited pad_deploy.json, a missing or unlisted file), is refused by ``load_deployed`` with one
  ValueError line naming the folder and what is wrong (``padmoe count``: exit 2, one line) — before any forward.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

E, V = 4, 320
PROMPT = torch.tensor([[5, 17, 42]])
GENERATION = dict(repetition_penalty=1.3, max_new_tokens=5, min_new_tokens=5, do_sample=False, eos_token_id=1,
                  pad_token_id=0)


def _tiny_mixtral(seed=0, **extra):
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    from pad_moe.hfmoe.experts import moe_blocks

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                             num_experts_per_tok=2, max_position_embeddings=64, eos_token_id=1,
                                             bos_token_id=None, pad_token_id=0, **extra))
    with torch.no_grad():
        for _, block in moe_blocks(model):
            block.experts.gate_up_proj.normal_(0, 0.3)
            block.experts.down_proj.normal_(0, 0.3)
    model.generation_config = GenerationConfig(**GENERATION)
    return model.eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Mixtral folder whose generation config is not transformers' default, its tokenizer and calibration
    text."""
    from pad_moe.lm.corpus import split_documents, vader_sentences
    from pad_moe.lm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("source")
    train, _ = split_documents(vader_sentences())
    tokenizer = train_bpe(train[:2000], V)
    _tiny_mixtral().save_pretrained(root / "mixtral")
    tokenizer.save_pretrained(root / "mixtral")
    (root / "calib.txt").write_text("\n".join(train[2000:2300]) + "\n")
    return root


def _compress(source, out, **kwargs):
    from pad_moe.hfmoe.compress import compress

    return compress(str(source / "mixtral"), out=str(out), calib=str(source / "calib.txt"), seq_len=32, batch_size=4,
                    calib_batches=2, iterations=2, **kwargs)


def _generation_fields(config) -> dict:
    return {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}


def _assert_generates_like_the_source(folder, source_folder):
    from transformers import GenerationConfig

    import pad_moe

    model = pad_moe.load_deployed(str(folder))
    want = GenerationConfig.from_pretrained(source_folder)
    assert _generation_fields(model.generation_config) == _generation_fields(want)
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.max_new_tokens == 5
    out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT))
    assert out.shape[1] - PROMPT.shape[1] == 5  # transformers' default (max_length 20) would give 17


@pytest.mark.parametrize("method", ["imp", "drop"])
def test_compress_keeps_the_sources_generation_settings(source, tmp_path, method):
    _compress(source, tmp_path / method, method=method, kappa=0.5)
    assert os.path.isfile(tmp_path / method / "generation_config.json")
    _assert_generates_like_the_source(tmp_path / method, source / "mixtral")


@pytest.mark.parametrize("mode, folder", [("pad", "deployed"), ("moe", "hf_model")])
def test_the_causal_lm_jobs_final_save_keeps_the_generation_settings(source, tmp_path, mode, folder):
    from transformers import AutoModelForCausalLM

    from pad_moe.config import load_config
    from pad_moe.lm.job import build_causal_lm_job

    cfg = load_config(None, ["model.arch=causal_lm", f"model.path={source / 'mixtral'}", "data.task=vader",
                             "data.max_length=32", "data.max_train=16", "data.max_eval=4", f"moe.mode={mode}",
                             f"moe.num_experts={E}", f"output_dir={tmp_path}", "name=gen"])
    job = build_causal_lm_job(cfg, 0)
    out = job.extras["save_final"](job.model, str(tmp_path))
    assert out == str(tmp_path / folder)
    if mode == "pad":
        _assert_generates_like_the_source(out, source / "mixtral")
    else:  # a plain HF folder (the input of padmoe compress)
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT)).shape[1] == PROMPT.shape[1] + 5


def _disk_params(folder) -> int:
    """Every tensor of the folder's safetensors files but the bit-packed masks."""
    return sum(t.numel() for name in os.listdir(folder) if name.endswith(".safetensors")
               for key, t in load_file(os.path.join(folder, name)).items() if ".experts.mask_" not in key)


def _count_json(folder, capsys, *flags):
    from pad_moe.deploy.count import count_main

    assert count_main([str(folder), "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_live_count_export_count_and_disk_agree(tmp_path, capsys, granularity):
    from pad_moe.accounting import count_live
    from pad_moe.hfmoe.deployed import save_compressed
    from pad_moe.hfmoe.experts import import_hf_moe, moe_blocks

    model = import_hf_moe(_tiny_mixtral(), granularity=granularity)
    g = torch.Generator().manual_seed(1)
    for _, block in moe_blocks(model):
        block.experts.set_masks({k: torch.rand(v.shape, generator=g) < 0.4 for k, v in block.experts.masks().items()})
    (tmp_path / "m").mkdir()
    meta = save_compressed(model, None, str(tmp_path / "m"), {"family": "mixtral", "method": "imp"})
    live = count_live(model)
    assert live["params_compact"] == meta["params_stored"] == _disk_params(tmp_path / "m")  # φ folded, not counted
    assert live["params_training"] - live["params_compact"] > 0
    counted = _count_json(tmp_path / "m", capsys)
    assert counted["params"] == meta["params_stored"] and counted["mode"] == "pad" and counted["export"]
    assert counted["granularity"] == granularity and 0.2 < counted["kappa"] < 0.6


def test_count_of_compressed_export_folders_is_what_they_store(source, tmp_path, capsys):
    from pad_moe.deploy.count import count_main
    from pad_moe.hfmoe.count import count_hf_moe

    source_count = count_hf_moe(str(source / "mixtral"))["params"]
    for method, kappa in (("imp", 0.5), ("drop", 0.7)):  # drop keeps 3 of the 4 experts (top 2 per token)
        summary = _compress(source, tmp_path / method, method=method, kappa=kappa)
        meta = json.loads((tmp_path / method / "pad_deploy.json").read_text())
        counted = _count_json(tmp_path / method, capsys)
        assert counted["params"] == meta["params_stored"] == summary["params_stored"] == _disk_params(tmp_path / method)
        assert counted["params"] < source_count == counted["params_training"]
        assert counted["params_active"] < counted["params"]
    assert abs(_count_json(tmp_path / "imp", capsys)["kappa"] - 0.5) < 0.01
    assert count_main([str(tmp_path / "imp")]) == 0
    assert "stored" in capsys.readouterr().out
    assert count_main([str(tmp_path / "imp"), "--kappa", "0.3"]) == 2  # an export is counted as stored
    err = capsys.readouterr().err
    assert "--kappa does not apply" in err and len(err.strip().splitlines()) == 1


# -- integrity: edited copies of a tiny export ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny PAD export (element masks) and a plain HF (drop-like) export, written once."""
    from pad_moe.hfmoe.deployed import save_compressed, save_plain_hf
    from pad_moe.hfmoe.experts import import_hf_moe, moe_blocks

    root = tmp_path_factory.mktemp("exports")
    model = import_hf_moe(_tiny_mixtral())
    g = torch.Generator().manual_seed(2)
    for _, block in moe_blocks(model):
        block.experts.set_masks({k: torch.rand(v.shape, generator=g) < 0.5 for k, v in block.experts.masks().items()})
    (root / "pad").mkdir()
    save_compressed(model, None, str(root / "pad"), {"family": "mixtral", "method": "imp", "granularity": "element"})
    (root / "plain").mkdir()
    save_plain_hf(_tiny_mixtral(seed=1), None, str(root / "plain"), {"family": "mixtral", "method": "drop"})
    return root


def _copy(exports, tmp_path, kind="pad"):
    return shutil.copytree(exports / kind, tmp_path / kind)


def _refresh_manifest(folder):
    """As a writer with the bug would: the manifest matches the edited files, so the deeper checks are reached."""
    from pad_moe.manifest import MANIFEST, write_manifest

    if os.path.exists(os.path.join(folder, MANIFEST)):
        os.remove(os.path.join(folder, MANIFEST))
    write_manifest(str(folder), format="pad_moe-hf-moe")


def _edit_weights(folder, edit, file="model.safetensors"):
    path = os.path.join(folder, file)
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_meta(folder, edit):
    path = os.path.join(folder, "pad_deploy.json")
    meta = json.loads(open(path).read())
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def _refused(folder, match, capsys=None):
    import pad_moe

    with pytest.raises(ValueError, match=match) as err:
        pad_moe.load_deployed(str(folder))
    message = str(err.value)
    assert str(folder) in message and "\n" not in message, message
    if capsys is not None:  # the CLI surface that reads exports: one line, exit 2
        from pad_moe.deploy.count import count_main

        capsys.readouterr()
        assert count_main([str(folder)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("padmoe count: error:"), lines
    return message


def _flip_mask_byte(path):
    """Flip the lowest bit of the first byte of the first mask, in place in the safetensors file (same size): one entry
    moves between static and dynamic."""
    with open(path, "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        key = next(k for k in sorted(header) if ".experts.mask_" in k)
        offset = 8 + header_len + header[key]["data_offsets"][0]
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def test_the_unedited_exports_load(exports):
    import pad_moe

    for kind in ("pad", "plain"):
        model = pad_moe.load_deployed(str(exports / kind))
        assert torch.isfinite(model(PROMPT).logits).all()


def test_a_flipped_mask_byte_is_refused(exports, tmp_path):
    folder = _copy(exports, tmp_path)
    _flip_mask_byte(folder / "model.safetensors")
    _refused(folder, "model.safetensors does not match its checksum")
    _refresh_manifest(folder)  # past the manifest: the value tensors no longer fit the masks
    _refused(folder, r"tensor .*experts\.(dynamic|static)_\w+ is of shape .*its block's masks give")


def test_value_tensors_of_the_wrong_shape_are_refused(exports, tmp_path):
    folder = _copy(exports, tmp_path)

    def cut(state):
        key = next(k for k in sorted(state) if ".experts.dynamic_" in k)
        state[key] = state[key][:, :-1].contiguous()

    _edit_weights(folder, cut)
    _refresh_manifest(folder)
    _refused(folder, r"dynamic_\w+ is of shape \(4, \d+\), its block's masks give \(4, \d+\)")


def test_fp16_weights_are_refused(exports, tmp_path):
    for kind in ("pad", "plain"):
        folder = _copy(exports, tmp_path, kind)
        file = "model.safetensors"
        _edit_weights(folder, lambda s: s.update({k: v.half() for k, v in s.items() if v.is_floating_point()}), file)
        _refresh_manifest(folder)
        _refused(folder, "is float16, pad_deploy.json records float32")


def test_non_finite_values_are_refused(exports, tmp_path):
    for kind in ("pad", "plain"):
        folder = _copy(exports, tmp_path, kind)

        def poison(state):
            key = next(k for k in sorted(state) if "layers.1" in k and state[k].is_floating_point())
            state[key] = state[key].clone()
            state[key].view(-1)[0] = float("nan")

        _edit_weights(folder, poison)
        _refresh_manifest(folder)
        _refused(folder, r"holds non-finite values \(NaN or inf\)")


def test_a_missing_manifest_and_unlisted_or_missing_files_are_refused(exports, tmp_path):
    folder = _copy(exports, tmp_path)
    os.remove(folder / "pad_moe_manifest.json")
    _refused(folder, "it has no pad_moe_manifest.json")
    _refresh_manifest(folder)
    (folder / "pytorch_model.bin").write_bytes(b"x")
    _refused(folder, "pytorch_model.bin is not in its pad_moe_manifest.json")
    os.remove(folder / "pytorch_model.bin")
    os.remove(folder / "generation_config.json")
    _refused(folder, "generation_config.json is missing")
    (folder / "pad_moe_manifest.json").write_text("{not json")
    _refused(folder, r"its manifest is unreadable \(JSONDecodeError\)")


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("dtype"), "field dtype is missing, expected one of float32"),
    (lambda m: m.update(dtype="float64"), 'field dtype is "float64", expected one of float32'),
    (lambda m: m.update(params_stored="57760"), 'field params_stored is "57760", expected an integer >= 0'),
    (lambda m: m.update(params_stored=12), "records params_stored 12, its weights hold"),
    (lambda m: m.update(tied=None), "field tied is null, expected a list of names"),
    (lambda m: m.pop("blocks"), "field blocks is missing"),
    (lambda m: m.update(blocks=[]), "field blocks is \\[\\], expected an object of block specs"),
    (lambda m: m.update(granularity="block"), 'field granularity is "block", expected one of element, neuron'),
    (lambda m: m.update(kappa="half"), 'field kappa is "half", expected a number in \\[0, 1\\]'),
    (lambda m: m.update(plain_hf="yes"), 'field plain_hf is "yes", expected true or false'),
    (lambda m: next(iter(m["blocks"].values())).update(granularity="block"),
     r'field blocks\.model\.layers\.0\.mlp\.granularity is "block", expected one of element, neuron'),
    (lambda m: next(iter(m["blocks"].values())).pop("num_experts"),
     r"field blocks\.model\.layers\.0\.mlp\.num_experts is missing, expected an integer >= 1"),
    (lambda m: next(iter(m["blocks"].values())).update(static_dropped="false"),
     r'field blocks\.model\.layers\.0\.mlp\.static_dropped is "false", expected true or false'),
    (lambda m: next(iter(m["blocks"].values())).update(act="gelu_fast_new"), "expected a transformers activation"),
    (lambda m: m["blocks"].update({"model.layers.0.mlp": 3}), r"field blocks\.model\.layers\.0\.mlp is 3"),
    (lambda m: m.update(version=1), "format 'pad_moe-hf-moe' v1 is not pad_moe-hf-moe v2"),
])
def test_an_edited_pad_deploy_json_is_one_clear_error(exports, tmp_path, capsys, edit, match):
    folder = _copy(exports, tmp_path)
    _edit_meta(folder, edit)
    _refresh_manifest(folder)
    _refused(folder, match, capsys)


def test_a_pad_deploy_json_that_is_not_an_object_is_one_clear_error(exports, tmp_path, capsys):
    folder = _copy(exports, tmp_path)
    (folder / "pad_deploy.json").write_text("[1, 2]")
    _refused(folder, r"field \(the file\) is \[1, 2\], expected a JSON object", capsys)


def test_an_edited_but_valid_pad_deploy_json_fails_its_checksum(exports, tmp_path):
    folder = _copy(exports, tmp_path)
    _edit_meta(folder, lambda m: m.update(method="random"))
    _refused(folder, r"pad_deploy.json (does not match its checksum|has \d+ bytes, the manifest says \d+)")
