"""Span-corruption pre-training of a tiny Switch PAD-MoE through pad_moe's trainer: 2 gloo ranks, ep_size 2, ZeRO-2,
IMP before training, checkpoints, TensorBoard; plus the data pieces (vocabulary, span corruption, collate)."""

import glob
import json

import pytest
import torch

from pad_moe.switch import data as D
from pad_moe.testing.ranks import run_ranks


def switch_config(preset: str, overrides: list[str]):
    """A RunConfig for a Switch preset. Until ``model.arch=switch`` and the Switch registry entries are wired into
    pad_moe.config / pad_moe.presets, fill the sections from ``registry_entries`` over the toy defaults."""
    from pad_moe.config import load_config
    from pad_moe.switch.presets import registry_entries

    entry = registry_entries()[preset]
    flat = [f"{sec}.{k}={json.dumps(v)}" for sec, vals in entry.items() for k, v in vals.items() if k != "arch"]
    cfg = load_config(None, flat + list(overrides))
    cfg.model.preset, cfg.model.arch = preset, "switch"
    return cfg


def _train(rank, world, out, overrides):
    import pad_moe.train.loop as loop
    from pad_moe.switch.job import build_switch_job

    loop.build_job = build_switch_job  # what build_job does for model.arch=switch once wired
    cfg = switch_config("switch-debug", [f"output_dir={out}", *overrides])
    summary = loop.train(cfg)
    return summary


COMMON = ["name=sw", "moe.mode=pad", "moe.ep_size=2", "partition.kappa=0.5", "partition.iterations=2",
          "partition.num_batches=2", "train.ds_config=configs/ds_zero2.json", "train.micro_batch_size=8",
          "train.steps=12", "train.lr=0.02", "train.log_every=4", "train.checkpoint_every=6", "data.train_size=512",
          "data.eval_size=32", "model.max_seq_len=24", "moe.capacity_factor=2.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("switch")
    summaries = run_ranks(_train, 2, str(out), COMMON, timeout=240)
    return {"dir": out / "sw", "summary": summaries[0]}


def test_two_rank_expert_parallel_pad_switch_learns_span_corruption(run):
    losses = run["summary"]["losses"]
    assert len(losses) == 12 and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert run["summary"]["world_size"] == 2
    record = run["summary"]["partition"]
    assert record["method"] == "imp" and abs(record["dynamic_per_round"][-1] / record["total_entries"] - 0.5) < 1e-3
    acc = run["summary"]["eval"]["eval"]["token_accuracy"]
    assert 0 < acc <= 1


def test_checkpoints_hold_expert_shards_and_tensorboard_has_router_scalars(run):
    step = run["dir"] / "checkpoints" / "step12"
    assert (step / "mp_rank_00_model_states.pt").is_file()
    # 2 sparse FFNs (encoder layer 1, decoder layer 1) x 4 experts, one file per expert
    assert len(glob.glob(str(step / "layer_*_expert_*_mp_rank_00_model_states.pt"))) == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in glob.glob(str(run["dir"] / "tensorboard" / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(f)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for want in ("train/loss", "train/aux_loss", "pad/lambda_d/0", "expert_load/layer1/e3",
                 "eval/eval/token_accuracy"):
        assert want in tags, (want, sorted(tags))


def test_vocab_span_corruption_and_collate_round_trip():
    texts = D.vader_texts()[:400]  # real sentences (python -m pad_moe.data installs them)
    vocab = D.BpeVocab.build(texts, size=512, num_sentinels=8)
    assert vocab.sentinel(0) == 511 and len(vocab.tokenizer) <= 504
    assert vocab.decode(vocab.encode("the film zzz")) == "the film zzz"  # bytes: nothing is unknown
    ids = vocab.encode(texts[0])
    g = torch.Generator().manual_seed(0)
    inp, tgt = D.span_corrupt(ids, vocab, g)
    assert inp[-1] == tgt[-1] == D.EOS
    # Putting each target span back in place of its sentinel restores the document.
    spans, cur = {}, None
    for t in tgt[:-1]:
        if t >= vocab.size - vocab.num_sentinels:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    restored = [x for t in inp[:-1] for x in (spans[t] if t in spans else [t])]
    assert restored == ids
    ds = D.SpanCorruptionDataset(texts, vocab, input_length=16)
    batch = D.collate([ds[0], ds[1]], 16, ds.target_length)
    assert batch["input_ids"].shape == (2, 16) and batch["labels"].shape == (2, ds.target_length)
    n = int((batch["labels"][0] != -100).sum())
    assert torch.equal(batch["decoder_input_ids"][0, 1:n], batch["labels"][0, :n - 1])
    assert batch["decoder_input_ids"][0, 0] == D.PAD


def test_vader_sentences_are_read_when_installed(tmp_path):
    from pad_moe.data import vader

    assert D.vader_texts(str(tmp_path)) is None  # nothing installed there: fall back, never download
    folder = tmp_path / "vader" / f"vaderSentiment-{vader.VADER_VERSION}"
    (folder / vader.CORPUS_SUBDIR).mkdir(parents=True)
    (folder / vader.MANIFEST).write_text("{}")
    (folder / vader.CORPUS_SUBDIR / vader.CORPUS_FILES["movies"]).write_text(
        "1\t2.5\ta gripping , funny film\r\n2\t-1.0\tthe plot drags\r\n", encoding="utf-8")
    assert D.vader_texts(str(tmp_path)) == ["a gripping , funny film", "the plot drags"]


def test_bad_text_input_names_the_value(tmp_path):
    import pad_moe.switch.job as J

    with pytest.raises(ValueError, match="nope.txt"):
        J.switch_texts(switch_config("switch-debug", ["name=sw", f"data.text_files=[{tmp_path / 'nope.txt'}]"]))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))  # was decoded with replacement characters, silently
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        J.switch_texts(switch_config("switch-debug", ["name=sw", f"data.text_files=[{latin1}]"]))
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        D.BpeVocab.build(["a b"], size=108, num_sentinels=8)


def test_span_corruption_without_text_is_refused_not_replaced(monkeypatch):
    import pad_moe.switch.job as J

    monkeypatch.setattr(J.D, "vader_texts", lambda cache_dir=None: None)
    cfg = switch_config("switch-debug", ["name=sw"])
    with pytest.raises(ValueError, match="VADER sentences, which are not installed"):
        J.switch_texts(cfg)
