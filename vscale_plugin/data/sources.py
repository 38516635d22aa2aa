"""Where documents come from: the offline smoke corpus, C4 from the hub, or local files, as shards of raw text.

Every dataset becomes a :class:`Source`: a ``datasets.IterableDataset`` whose shards (one per file, or contiguous
slices of an in-memory table) are read in file order. Shuffling, the split between data-parallel ranks and the
held-out eval slice are decided by :mod:`vscale_plugin.data.packing`, on top of this one representation, so the
smoke corpus, C4 and a user's files all go through the same code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import datasets

from vscale_plugin.data.errors import DataError
from vscale_plugin.data.hub import hub_unreachable

Split = Literal["train", "eval"]

TEXT = "text"

C4_REPO = "allenai/c4"
C4_CONFIG = "en"
_C4_SPLITS: dict[Split, str] = {"train": "train", "eval": "validation"}

# In-memory tables are cut into this many shards: divisible by every power-of-two world size up to 64, so
# ranks can take whole shards (see packing) instead of all reading every document.
_TABLE_SHARDS = 64

_FORMATS = {
    ".jsonl": "json",
    ".jsonl.gz": "json",
    ".json": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
_PATH_HELP = (
    "give 'smoke', 'c4', a .jsonl/.json/.parquet/.txt file (documents in a 'text' field; a .txt file is one "
    "document), a directory of such files, or a directory written by Dataset.save_to_disk"
)


@dataclass(frozen=True)
class Source:
    """A dataset as ordered shards of documents.

    ``holdout``: the eval split is a held-out slice of this same data (local data without an eval split of its
    own); otherwise train and eval are separate sources (C4's "validation", a saved DatasetDict's "validation").
    """

    label: str
    dataset: datasets.IterableDataset
    shard_labels: tuple[str, ...]
    holdout: bool

    @property
    def num_shards(self) -> int:
        return self.dataset.num_shards

    def documents(self, shard: int, start: int = 0, stop: int | None = None) -> Iterator[str | None]:
        """Entries ``[start, stop)`` of one shard in file order; ``None`` for an entry with no text.

        Empty entries keep their index, so that positions in the stream stay stable, but carry no document
        (they would only add a lone EOS).
        """
        rows = islice(iter(self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)), start, stop)
        while True:
            try:
                row = next(rows, None)
            except (OSError, ValueError) as err:
                # A file that is not what its name says (binary data in a .jsonl, a broken parquet) fails only when
                # it is read; UnicodeDecodeError and pyarrow's ArrowInvalid are ValueErrors.
                first = str(err).splitlines()[0] if str(err) else ""
                raise DataError(
                    f"{self.shard_labels[shard]}: cannot be read ({type(err).__name__}: {first[:200]}); {_PATH_HELP}"
                ) from err
            if row is None:
                return
            if TEXT not in row:
                raise DataError(
                    f"{self.shard_labels[shard]}: no '{TEXT}' field (fields: {', '.join(sorted(row)) or 'none'}); "
                    f"store each document's text under '{TEXT}'"
                )
            text = row[TEXT]
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{self.shard_labels[shard]}: '{TEXT}' holds {type(text).__name__}, not a string; store each "
                    f"document as one string under '{TEXT}'"
                )
            yield text or None


def smoke_documents() -> list[str]:
    """Python's own help topics (``pydoc_data``, ~0.5 MB of English): present wherever Python is, never downloaded.

    One topic is one document, in sorted topic order, each text once (some topics share one). The text depends
    on the Python version, which is why the smoke tokenizer's cache key includes a digest of it.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise DataError(
            "--dataset smoke reads Python's help topics (pydoc_data), which this Python installation lacks; "
            "install the full standard library (e.g. the distribution's python3 package) or pass --dataset PATH"
        ) from err
    return list(dict.fromkeys(topics[name] for name in sorted(topics)))


def open_dataset(dataset: str, split: Split) -> Source:
    """The source behind ``--dataset``: ``"smoke"``, ``"c4"`` or a path."""
    if dataset == "smoke":
        return _table_source("smoke corpus", datasets.Dataset.from_dict({TEXT: smoke_documents()}), holdout=True)
    if dataset == "c4":
        return open_c4(split)
    return _open_path(Path(dataset), split)


def open_c4(split: Split, data_files: str | Sequence[str] | None = None) -> Source:
    """``allenai/c4`` "en" streamed from the Hugging Face hub: "train" for training, "validation" for eval.

    With ``data_files``, the same code reads local JSON lines of C4's schema (text, timestamp, url) instead of
    the hub, for both splits; the tests run the C4 path this way on a sample. Each hub file is one shard
    (1024 for train, 8 for validation).
    """
    if data_files is not None:
        label = f"C4 files {data_files}"
        try:
            stream = datasets.load_dataset("json", data_files=data_files, split="train", streaming=True)
        except (OSError, ValueError) as err:
            raise DataError(f"{label}: cannot be read ({err}); pass existing C4 json(.gz) files") from err
        files = [str(f) for f in ([data_files] if isinstance(data_files, str) else data_files)]
    else:
        label = f"{C4_REPO} ({C4_CONFIG}, {_C4_SPLITS[split]})"
        offline = hub_unreachable()
        if offline is not None:
            raise DataError(
                f"--dataset c4 streams {C4_REPO} from the Hugging Face hub, which is not reachable ({offline}); run "
                "with network access, or download C4 shards and pass them with --dataset PATH"
            )
        try:
            stream = datasets.load_dataset(C4_REPO, C4_CONFIG, split=_C4_SPLITS[split], streaming=True)
        except OSError as err:
            raise DataError(
                f"--dataset c4 streams {C4_REPO} from the Hugging Face hub, which is not reachable ({err}); run "
                "with network access, or download C4 shards and pass them with --dataset PATH"
            ) from err
        files = []
    labels = (
        tuple(files)
        if len(files) == stream.num_shards
        else tuple(f"{label}, shard {i}" for i in range(stream.num_shards))
    )
    return Source(label, stream, labels, holdout=False)


def _open_path(path: Path, split: Split) -> Source:
    if not path.exists():
        raise DataError(f"--dataset {path}: no such file or directory; {_PATH_HELP}")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _open_saved(path, split)
    if path.is_file():
        files = [path]
        if _format_of(path) is None:
            raise DataError(f"--dataset {path}: unsupported file type; {_PATH_HELP}")
    else:
        files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file() and _format_of(f) and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            raise DataError(f"--dataset {path}: the directory holds no .jsonl/.json/.parquet/.txt files; {_PATH_HELP}")
    # An empty file holds no documents, and datasets' json reader fails on one with a bare StopIteration.
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise DataError(f"--dataset {path}: empty, it holds no documents; {_PATH_HELP}")
    builders = sorted({_format_of(f) for f in files})
    if len(builders) > 1:
        raise DataError(
            f"--dataset {path}: mixes file formats ({', '.join(builders)}); keep one format per dataset directory"
        )
    builder = builders[0]
    # A .txt file is one document: EOS marks the end of a document, so paragraphs of one text must not get one.
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        stream = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=True, **options
        )
    except (OSError, ValueError) as err:
        raise DataError(f"--dataset {path}: cannot be read as {builder} ({err}); {_PATH_HELP}") from err
    return Source(f"--dataset {path}", stream, tuple(str(f) for f in files), holdout=True)


def _open_saved(path: Path, split: Split) -> Source:
    try:
        saved = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"--dataset {path}: not a readable saved dataset ({err}); {_PATH_HELP}") from err
    if isinstance(saved, datasets.DatasetDict):
        own_eval = next((name for name in ("validation", "test") if name in saved), None)
        if split == "eval" and own_eval is not None:
            return _table_source(f"--dataset {path} [{own_eval}]", saved[own_eval], holdout=False)
        train = "train" if "train" in saved else next(iter(saved))
        return _table_source(f"--dataset {path} [{train}]", saved[train], holdout=own_eval is None)
    return _table_source(f"--dataset {path}", saved, holdout=True)


def _table_source(label: str, table: datasets.Dataset, holdout: bool) -> Source:
    if TEXT not in table.column_names:
        raise DataError(
            f"{label}: no '{TEXT}' column (columns: {', '.join(table.column_names)}); rename the document column, "
            f"e.g. ds.rename_column('content', '{TEXT}').save_to_disk(...)"
        )
    if len(table) == 0:
        raise DataError(f"{label}: holds no documents; {_PATH_HELP}")
    num_shards = min(len(table), _TABLE_SHARDS)
    stream = table.select_columns([TEXT]).to_iterable_dataset(num_shards=num_shards)
    return Source(label, stream, tuple(f"{label}, shard {i}" for i in range(num_shards)), holdout=holdout)


def _format_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((builder for suffix, builder in _FORMATS.items() if name.endswith(suffix)), None)
