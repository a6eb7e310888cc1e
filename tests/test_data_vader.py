"""The VADER corpora: parsing, split, safe install into the cache, fetch failures; the real corpus when reachable."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import types

import pytest
from transformers import AutoTokenizer

from pad_moe.data import load_task, minilm_path, task_info, vader
from pad_moe.data.vader import CorpusUnavailableError


def one_line_error(fn, match: str, kind=ValueError) -> str:
    with pytest.raises(kind, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def movie_lines() -> list[str]:
    """60 made-up sentences in the real file's layout, plus a zero score, a duplicate text and non-ASCII text."""
    lines = [f"{i}\t{(-1) ** i * (0.5 + i / 20):.11g}\tsentence {i} of a film that was {('bad', 'good')[i % 2 == 0]}"
             for i in range(1, 61)]
    lines += ["61\t0\tneither here nor there .", "62\t1.5\tsentence 2 of a film that was good",
              "63\t-2.8125\tthe hippie turned yuppie plot \u2019s charm fades"]
    return lines


def ground_truth_bytes(lines: list[str]) -> bytes:
    return "\r\n".join(lines).encode("utf-8")  # CRLF, no final newline: as in the real files


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", symlink_to: str | None = None) -> None:
    member = tarfile.TarInfo(name)
    if symlink_to is not None:
        member.type, member.linkname = tarfile.SYMTYPE, symlink_to
        tar.addfile(member)
    else:
        member.size, member.mode = len(data), 0o777
        tar.addfile(member, io.BytesIO(data))


def make_sdist(path, corpus_overrides: dict | None = None, symlink_readme: bool = False) -> str:
    files = {name: ground_truth_bytes(["1\t1.0\tfine"]) for name in vader.CORPUS_FILES.values()}
    files[vader.CORPUS_FILES["movies"]] = ground_truth_bytes(movie_lines())
    files.update(corpus_overrides or {})
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, data in files.items():
            add_member(tar, f"hutto_ICWSM_2014/{name}", data)
        if symlink_readme:
            add_member(tar, "hutto_ICWSM_2014/_README_.txt", symlink_to="/etc/passwd")
        else:
            add_member(tar, "hutto_ICWSM_2014/_README_.txt", b"readme")
        add_member(tar, "hutto_ICWSM_2014/../../escaped.txt", b"outside")  # path traversal: never extracted
        add_member(tar, "/tmp/absolute_escape.txt", b"outside")
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "vaderSentiment-3.3.2/LICENSE.txt", b"The MIT License")
        add_member(tar, vader.INNER_ARCHIVE, inner.getvalue())
    return str(path)


@pytest.fixture()
def installed_cache(tmp_path):
    cache = tmp_path / "cache"
    vader.install_archive(make_sdist(tmp_path / vader.SDIST_NAME), cache, sha256=None)
    return cache


def test_read_ground_truth_handles_the_real_layout(tmp_path):
    path = tmp_path / "movies.txt"
    path.write_bytes(ground_truth_bytes(movie_lines()))
    rows = vader.read_ground_truth(path)
    assert len(rows) == 63 and rows[0] == ("1", -0.55, "sentence 1 of a film that was bad")
    assert rows[-1][2].endswith("plot \u2019s charm fades") and rows[60][1] == 0.0
    path.write_bytes(b"1\t0.5\tok\r\n2\tnot-a-number\tbad\r\n")
    message = one_line_error(lambda: vader.read_ground_truth(path), "expected 'id<TAB>score<TAB>text'")
    assert f"{path}:2" in message
    one_line_error(lambda: vader.read_ground_truth(tmp_path / "absent.txt"), "not found: .*absent.txt")


def test_split_is_a_stable_hash_of_the_text_and_zeros_leave_the_binary_task():
    assert [vader.split_of(f"s{i}") for i in range(8)] == [vader.split_of(f"s{i}") for i in range(8)]
    shares = [vader.split_of(f"sentence {i}") for i in range(2000)]
    assert 150 <= shares.count("validation") <= 250  # about 10 %
    rows = [(i, float(score), text) for i, score, text in (line.split("\t") for line in movie_lines())]
    binary, regression = vader.build_splits(rows, regression=False), vader.build_splits(rows, regression=True)
    assert sum(len(d) for d in binary.values()) == 62 and sum(len(d) for d in regression.values()) == 63
    assert "61" not in list(binary["train"]["id"]) + list(binary["validation"]["id"])
    assert binary["train"].column_names == ["id", "sentence", "label"]
    for split in ("train", "validation"):  # the duplicated sentence (ids 2 and 62) sits on one side only
        assert list(regression[split]["id"]).count("2") == list(regression[split]["id"]).count("62")
        assert set(binary[split]["label"]) <= {0, 1}
    assert regression["train"].features["label"].dtype == "float32"


def test_install_is_safe_complete_and_done_once(tmp_path, installed_cache):
    corpus = vader.corpus_dir(installed_cache)
    assert vader.is_installed(installed_cache) and corpus.startswith(str(installed_cache))
    manifest = json.load(open(os.path.join(corpus, vader.MANIFEST)))
    assert set(manifest["files"]) == set(vader.CORPUS_FILES.values())
    names = sorted(os.listdir(os.path.join(corpus, vader.CORPUS_SUBDIR)))
    assert names == sorted([*vader.CORPUS_FILES.values(), "LICENSE.txt", "_README_.txt"])
    assert not any("escape" in f for _, _, fs in os.walk(tmp_path) for f in fs)
    assert not os.path.exists("/tmp/absolute_escape.txt")
    assert [n for n in os.listdir(vader.vader_cache_dir(installed_cache)) if n.startswith(".")] == []  # no leftovers
    # installed: a second install or ensure_corpus touches nothing and never calls pip
    assert vader.install_archive(tmp_path / "absent.tar.gz", installed_cache) == corpus


def test_archive_checks(tmp_path):
    sdist = make_sdist(tmp_path / vader.SDIST_NAME)
    one_line_error(lambda: vader.install_archive(sdist, tmp_path / "c1"), "sha256 differs", CorpusUnavailableError)
    bad = make_sdist(tmp_path / "symlinked.tar.gz", symlink_readme=True)
    one_line_error(lambda: vader.install_archive(bad, tmp_path / "c2", sha256=None), "lacks hutto_ICWSM_2014/_README_",
                   CorpusUnavailableError)
    assert not vader.is_installed(tmp_path / "c2") and not os.path.exists(vader.corpus_dir(tmp_path / "c2"))
    one_line_error(lambda: vader.install_archive(tmp_path / "nope.tar.gz", tmp_path / "c3"), "archive not found")


def test_fetch_failure_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    def pip_fails(dest):
        return subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version\nERROR: No matching dist")

    monkeypatch.setattr(vader, "_run_pip", pip_fails)
    message = one_line_error(lambda: vader.ensure_corpus(tmp_path / "c"), "pip could not download it",
                             CorpusUnavailableError)
    assert "No matching dist" in message
    assert "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2" in message and "--archive PATH" in message
    stub_tokenizer = types.SimpleNamespace(pad_token_id=0)  # never reached: the corpus is missing first
    one_line_error(lambda: load_task("vader-movies", stub_tokenizer, cache_dir=tmp_path / "c"), "could not download")


def test_fetch_downloads_once_then_reads_the_cache(tmp_path, monkeypatch):
    sdist = make_sdist(tmp_path / "source.tar.gz")
    calls = []

    def fake_pip(dest):
        calls.append(dest)
        with open(sdist, "rb") as src, open(os.path.join(dest, vader.SDIST_NAME), "wb") as out:
            out.write(src.read())
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(vader, "_run_pip", fake_pip)
    monkeypatch.setattr(vader, "SDIST_SHA256", hashlib.sha256(open(sdist, "rb").read()).hexdigest())
    monkeypatch.setenv("PAD_MOE_CACHE", str(tmp_path / "env-cache"))
    assert vader.vader_cache_dir() == str(tmp_path / "env-cache" / "vader")
    first, second = vader.ensure_corpus(), vader.ensure_corpus()
    assert first == second == vader.corpus_dir() and len(calls) == 1


def test_vader_tasks_tokenise_like_sst2_and_stsb(installed_cache):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train, evals, info = load_task("vader-movies", tokenizer, cache_dir=installed_cache)
    assert (info.text_columns, info.num_labels, info.metric) == (("sentence",), 2, "accuracy")
    assert len(train) + len(evals["validation"]) == 62 and set(train[0]) >= {"input_ids", "attention_mask", "labels"}
    train, evals, info = load_task("vader-movies-reg", tokenizer, cache_dir=installed_cache, max_train=10, max_eval=3)
    assert (len(train), len(evals["validation"]), info.metric) == (10, 3, "pearson_spearman")
    assert train[0]["labels"].dtype.is_floating_point
    assert task_info("vader-tweets").source == "vader"


def test_real_vader_corpus():
    """The real corpus, from the cache or fetched from PyPI once (skipped only when neither is possible)."""
    try:
        corpus = vader.ensure_corpus()
    except CorpusUnavailableError as error:
        pytest.skip(f"VADER corpus neither cached nor downloadable here: {error}")
    movies = os.path.join(corpus, vader.CORPUS_SUBDIR, vader.CORPUS_FILES["movies"])
    assert hashlib.sha256(open(movies, "rb").read()).hexdigest() == (
        "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350")
    rows = vader.read_ground_truth(movies)
    assert len(rows) == 10605 and sum(s > 0 for _, s, _ in rows) == 5242 and sum(s == 0 for _, s, _ in rows) == 37
    binary = vader.load_vader_splits(task_info("vader-movies"))
    regression = vader.load_vader_splits(task_info("vader-movies-reg"))
    assert (len(binary["train"]), len(binary["validation"])) == (9498, 1070)
    assert (len(regression["train"]), len(regression["validation"])) == (9533, 1072)
    assert sum(binary["train"]["label"]) == 4728 and sum(binary["validation"]["label"]) == 514
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train, evals, _ = load_task("vader-movies", tokenizer, max_train=256, max_eval=64)
    assert (len(train), len(evals["validation"])) == (256, 64)
    assert 0.35 < float(sum(int(train[i]["labels"]) for i in range(256))) / 256 < 0.65  # not the sorted-file prefix


def test_command_line_installs_and_reports(tmp_path, installed_cache, capsys):
    assert vader.main(["--cache-dir", str(installed_cache)]) == 0  # already installed: lists the corpora, no pip
    assert "movies      63 sentences, 31 positive" in capsys.readouterr().out
    sdist = make_sdist(tmp_path / "other.tar.gz")
    assert vader.main(["--cache-dir", str(tmp_path / "fresh"), "--archive", sdist]) == 2  # not the real archive
    assert "sha256 differs" in capsys.readouterr().err


def test_pooled_multi_domain_task_is_the_union_with_per_corpus_dev_splits(installed_cache):
    """vader-all trains on all four corpora and evaluates on the pooled split and on each corpus's own, which are
    exactly the single-corpus tasks' validation splits."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    pooled = vader.load_vader_splits(task_info("vader-all"), installed_cache)
    assert set(pooled) == {"train", "validation", *vader.DOMAIN_SPLITS}
    total = {"train": 0, "validation": 0}
    for corpus in vader.CORPUS_FILES:
        single = vader.load_vader_splits(task_info(f"vader-{corpus}"), installed_cache)
        assert pooled[f"validation-{corpus}"]["sentence"] == single["validation"]["sentence"]
        for split in total:
            total[split] += len(single[split])
    assert {s: len(pooled[s]) for s in total} == total
    train, evals, info = load_task("vader-all-reg", tokenizer, cache_dir=installed_cache)
    assert list(evals) == ["validation", *vader.DOMAIN_SPLITS] and info.metric == "pearson_spearman"
