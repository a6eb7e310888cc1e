"""The offline default data: the VADER sentiment corpora (Hutto & Gilbert, ICWSM 2014; MIT) from PyPI.

The vaderSentiment 3.3.2 source archive holds ``additional_resources/hutto_ICWSM_2014.tar.gz`` with four
``*_GroundTruth.txt`` files: one sentence per line, ``id<TAB>mean human sentiment (-4..+4)<TAB>text`` (UTF-8, CRLF).
pad_moe downloads the archive once with pip and keeps the corpus files in ``<cache>/vader/vaderSentiment-3.3.2/``;
``<cache>`` is the ``cache_dir`` argument, else ``$PAD_MOE_CACHE``, else ``~/.cache/pad_moe``.

Tasks, per corpus (movies, tweets, nyt, amazon): ``vader-<corpus>`` is binary (label = score > 0; sentences whose mean
score is exactly 0 are dropped, 37 of the 10,605 movie sentences) and ``vader-<corpus>-reg`` is regression on the
score. ``vader-all`` / ``vader-all-reg`` pool the four corpora (multi-domain): training on all of them, evaluation on
the pooled ``validation`` split and on each corpus's own (``validation-movies``, ..., the same sentences as the
single-corpus tasks' validation splits). Split: a sentence is in ``validation`` when blake2b-64(its UTF-8 text)
mod 1000 < 100 (about 10 %), else in ``train``; hashing the text (not the id) keeps duplicated sentences on one side
of the split.

    python -m pad_moe.data [--cache-dir DIR] [--archive vaderSentiment-3.3.2.tar.gz]   # fetch / install now
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from datasets import Dataset, Features, Value

from pad_moe.data.task_info import TaskInfo

VADER_VERSION = "3.3.2"
SDIST_NAME = f"vaderSentiment-{VADER_VERSION}.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
OUTER_LICENSE = f"vaderSentiment-{VADER_VERSION}/LICENSE.txt"
CORPUS_SUBDIR = "hutto_ICWSM_2014"
CORPUS_FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
}
_CORPUS_DESCRIPTIONS = {
    "movies": "movie-review sentences (Rotten Tomatoes, the source of SST)",
    "tweets": "tweet-like texts",
    "nyt": "New York Times editorial sentences",
    "amazon": "Amazon product-review sentences",
}
MANIFEST = "pad_moe_manifest.json"
DEV_PER_MILLE = 100
PIP_DOWNLOAD = ["pip", "download", "--no-deps", "--no-binary", ":all:", f"vaderSentiment=={VADER_VERSION}"]
MANUAL_FETCH = (f"on a machine with PyPI run `python -m {' '.join(PIP_DOWNLOAD)} -d DIR`, copy DIR/{SDIST_NAME} "
                f"here and run `python -m pad_moe.data --archive PATH` (add --cache-dir DIR if you use one)")


class CorpusUnavailableError(ValueError):
    """The VADER corpus is not cached and could not be fetched."""


POOLED = "all"
"""The corpus name of the multi-domain tasks (all four corpora pooled)."""
DOMAIN_SPLITS = tuple(f"validation-{c}" for c in CORPUS_FILES)


def _task_pairs() -> dict[str, TaskInfo]:
    tasks = {}
    for corpus, what in _CORPUS_DESCRIPTIONS.items():
        tasks[f"vader-{corpus}"] = TaskInfo(
            f"vader-{corpus}", ("sentence",), 2, "accuracy", label_names=("negative", "positive"), source="vader",
            description=f"VADER {what}: sentiment sign, score 0 dropped (SST-2-like)")
        tasks[f"vader-{corpus}-reg"] = TaskInfo(
            f"vader-{corpus}-reg", ("sentence",), 1, "pearson_spearman", source="vader",
            description=f"VADER {what}: mean human sentiment -4..+4 (regression, STS-B-like)")
    pooled = ("validation", *DOMAIN_SPLITS)
    tasks[f"vader-{POOLED}"] = TaskInfo(
        f"vader-{POOLED}", ("sentence",), 2, "accuracy", eval_splits=pooled, label_names=("negative", "positive"),
        source="vader", description="VADER, the four corpora pooled (multi-domain), binary; per-corpus dev splits")
    tasks[f"vader-{POOLED}-reg"] = TaskInfo(
        f"vader-{POOLED}-reg", ("sentence",), 1, "pearson_spearman", eval_splits=pooled, source="vader",
        description="VADER, the four corpora pooled (multi-domain), regression; per-corpus dev splits")
    return tasks


VADER_TASKS: dict[str, TaskInfo] = _task_pairs()


def vader_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """``<cache>/vader`` (cache: the argument, else $PAD_MOE_CACHE, else ~/.cache/pad_moe)."""
    root = cache_dir or os.environ.get("PAD_MOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pad_moe")
    return os.path.join(os.fspath(root), "vader")


def corpus_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """Where the installed corpus files live (may not exist yet)."""
    return os.path.join(vader_cache_dir(cache_dir), f"vaderSentiment-{VADER_VERSION}")


def is_installed(cache_dir: str | os.PathLike | None = None) -> bool:
    return os.path.isfile(os.path.join(corpus_dir(cache_dir), MANIFEST))


def _sha256(path: str) -> str:
    from pad_moe.manifest import sha256_of

    return sha256_of(path)


def install_archive(archive: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                    sha256: str | None = SDIST_SHA256) -> str:
    """Install the corpus files from a vaderSentiment source archive into the cache; returns the corpus directory.

    Only the known corpus files are extracted (tarfile filter='data'), into a temporary directory renamed into place
    at the end, so a reader never sees a half-written corpus; an existing corpus is kept as it is.
    """
    archive, final = os.fspath(archive), corpus_dir(cache_dir)
    if is_installed(cache_dir):
        return final
    if not os.path.isfile(archive):
        raise CorpusUnavailableError(f"VADER archive not found: {archive}")
    if sha256 is not None and _sha256(archive) != sha256:
        raise CorpusUnavailableError(f"{archive} is not {SDIST_NAME} (sha256 differs from {sha256}); {MANUAL_FETCH}")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(final))
    wanted = {f"{CORPUS_SUBDIR}/{name}" for name in (*CORPUS_FILES.values(), "_README_.txt")}
    try:
        try:
            with tarfile.open(archive, "r:gz") as outer:
                inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
                license_text = outer.extractfile(OUTER_LICENSE).read() if OUTER_LICENSE in outer.getnames() else b""
            with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
                members = [m for m in inner.getmembers() if m.name in wanted and m.isfile()]
                missing = sorted(wanted - {m.name for m in members})
                if missing:
                    raise CorpusUnavailableError(f"{archive}: {INNER_ARCHIVE} lacks {', '.join(missing)}")
                inner.extractall(staging, members=members, filter="data")
        except (KeyError, AttributeError, tarfile.TarError, EOFError) as error:
            raise CorpusUnavailableError(f"{archive} is not a readable {SDIST_NAME} ({type(error).__name__}: "
                                         f"{' '.join(str(error).split())}); {MANUAL_FETCH}") from error
        with open(os.path.join(staging, CORPUS_SUBDIR, "LICENSE.txt"), "wb") as f:
            f.write(license_text)
        files = {name: _sha256(os.path.join(staging, CORPUS_SUBDIR, name)) for name in CORPUS_FILES.values()}
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump({"source": SDIST_NAME, "sdist_sha256": _sha256(archive), "files": files}, f, indent=1)
        os.chmod(staging, 0o755)  # mkdtemp made it private
        try:
            os.rename(staging, final)
        except OSError as error:
            if not is_installed(cache_dir):  # not a lost race with another process: a real failure
                raise CorpusUnavailableError(f"cannot install the VADER corpus into {final} ({error}); "
                                             f"remove {final} and retry") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _run_pip(dest: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", *PIP_DOWNLOAD, "-d", dest, "--disable-pip-version-check"]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


def ensure_corpus(cache_dir: str | os.PathLike | None = None) -> str:
    """The corpus directory, downloading the archive with pip the first time; never downloads when present."""
    if is_installed(cache_dir):
        return corpus_dir(cache_dir)
    os.makedirs(vader_cache_dir(cache_dir), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=vader_cache_dir(cache_dir)) as tmp:
        try:
            result = _run_pip(tmp)
            reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as error:
            result, reason = None, f"{type(error).__name__}: {error}"
        found = [name for name in os.listdir(tmp) if name.lower() == SDIST_NAME.lower()]  # pip may normalise case
        archive = os.path.join(tmp, found[0] if found else SDIST_NAME)
        if result is None or result.returncode != 0 or not found:
            raise CorpusUnavailableError(f"the VADER corpus is not in {corpus_dir(cache_dir)} and pip could not "
                                         f"download it ({' '.join(reason.split())}); {MANUAL_FETCH}")
        return install_archive(archive, cache_dir, sha256=SDIST_SHA256)


def read_ground_truth(path: str | os.PathLike) -> list[tuple[str, float, str]]:
    """(id, mean score, text) per line of a ``*_GroundTruth.txt`` file; blank lines are skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"VADER corpus file not found: {path}")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 ({error})") from error
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        try:
            if len(fields) != 3 or not fields[2].strip():
                raise ValueError
            rows.append((fields[0].strip(), float(fields[1]), fields[2].strip()))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'id<TAB>score<TAB>text', got {line[:60]!r}") from None
    if not rows:
        raise ValueError(f"{path} holds no sentences")
    return rows


def split_of(text: str) -> str:
    """``validation`` for about 10 % of sentences, chosen by a hash of the text; else ``train``."""
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") % 1000
    return "validation" if bucket < DEV_PER_MILLE else "train"


def build_splits(rows: list[tuple[str, float, str]], regression: bool) -> dict[str, Dataset]:
    """``train`` / ``validation`` Datasets (columns id, sentence, label) from parsed rows; file order kept."""
    features = Features({"id": Value("string"), "sentence": Value("string"),
                         "label": Value("float32") if regression else Value("int64")})
    columns = {s: {"id": [], "sentence": [], "label": []} for s in ("train", "validation")}
    for row_id, score, text in rows:
        if not regression and score == 0:
            continue
        column = columns[split_of(text)]
        column["id"].append(row_id)
        column["sentence"].append(text)
        column["label"].append(score if regression else int(score > 0))
    return {s: Dataset.from_dict(c, features=features) for s, c in columns.items()}


def load_vader_splits(info: TaskInfo, cache_dir: str | os.PathLike | None = None) -> dict[str, Dataset]:
    """The task's train and validation Datasets from the cached corpus (fetched on first use)."""
    corpus = info.name.removeprefix("vader-").removesuffix("-reg")
    if info.source != "vader" or corpus not in (*CORPUS_FILES, POOLED):
        raise ValueError(f"{info.name!r} is not a VADER task; allowed: {', '.join(VADER_TASKS)}")
    root = os.path.join(ensure_corpus(cache_dir), CORPUS_SUBDIR)
    if corpus != POOLED:
        return build_splits(read_ground_truth(os.path.join(root, CORPUS_FILES[corpus])), info.is_regression)
    from datasets import concatenate_datasets

    per_corpus = {c: build_splits(read_ground_truth(os.path.join(root, f)), info.is_regression)
                  for c, f in CORPUS_FILES.items()}
    splits = {s: concatenate_datasets([per_corpus[c][s] for c in CORPUS_FILES]) for s in ("train", "validation")}
    splits.update({f"validation-{c}": per_corpus[c]["validation"] for c in CORPUS_FILES})
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pad_moe.data", description="Fetch the VADER corpora.")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $PAD_MOE_CACHE, ~/.cache/pad_moe)")
    parser.add_argument("--archive", default=None, help=f"install from a downloaded {SDIST_NAME} instead of pip")
    args = parser.parse_args(argv)
    try:
        path = install_archive(args.archive, args.cache_dir) if args.archive else ensure_corpus(args.cache_dir)
        for corpus, name in CORPUS_FILES.items():
            file = os.path.join(path, CORPUS_SUBDIR, name)
            rows = read_ground_truth(file)
            positive = sum(score > 0 for _, score, _ in rows)
            print(f"{corpus:7s} {len(rows):6d} sentences, {positive} positive, {file}")
    except ValueError as error:
        print(f"pad_moe.data: error: {error}", file=sys.stderr)
        return 2
    return 0
