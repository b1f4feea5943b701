"""Read raw source files as described by a dataset spec, every value as a string.

Values stay strings here so that validation (nodes.check_events) can say exactly which value broke
which rule, and so that a malformed line is kept whole in ``_corrupt_record`` instead of being lost.
The header of every matching file is checked against the spec before Spark reads anything.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.ingest.nodes import CORRUPT, SOURCE
from pipelines.specs import DatasetSpec, SourceFile, SpecError


def matching_files(spec: DatasetSpec, source: Path, part: SourceFile, what: str) -> list[Path]:
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    files = (
        sorted(p for p in source.glob(part.file) if p.is_file()) if source.is_dir() else [source]
    )
    if not files:
        raise SpecError(
            f"dataset spec {spec.name!r}: no file matches {part.file!r} ({what}) in {source}"
        )
    return files


SNIFF_BYTES = 64 * 1024
"""How much of each text file is checked for NUL bytes and UTF-8 before Spark reads it."""


def check_text_file(path: Path, what: str) -> None:
    """Refuse, naming the file, what Spark would read as garbage rows: binary or non-UTF-8
    content (a compressed or misplaced file), or an empty file (no header, no rows)."""
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if not head.strip():
        raise SpecError(f"{what} source {path} is empty: expected a header line and rows")
    if b"\x00" in head:
        raise SpecError(
            f"{what} source {path} is binary (NUL bytes in its first {len(head):,} bytes), not "
            "a text file: decompress it, or point --source at the CSV/TSV files"
        )
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sniff
            raise SpecError(
                f"{what} source {path} is not UTF-8 text (byte {exc.start:,}: "
                f"{head[exc.start : exc.start + 1]!r}); re-encode it as UTF-8"
            ) from None


def read_header(path: Path, delimiter: str) -> list[str]:
    """Column names from the first line; unnamed columns become ``_c<i>`` as Spark names them."""
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        first = next(csv.reader(handle, delimiter=delimiter), [])
    return [name.strip() or f"_c{i}" for i, name in enumerate(first)]


def _file_columns(
    spec: DatasetSpec, files: list[Path], part: SourceFile, delimiter: str, what: str
) -> list[str]:
    """The file's real column list, after checking the spec's columns are all in it."""
    for path in files:
        check_text_file(path, what)
    if not spec.header:
        return list(part.columns)
    header = read_header(files[0], delimiter)
    for path in files[1:]:
        if read_header(path, delimiter) != header:
            raise SpecError(
                f"dataset spec {spec.name!r}: {path.name} has a different header from "
                f"{files[0].name} ({what} files must share one layout)"
            )
    missing = [c for c in part.columns if c not in header]
    if missing:
        raise SpecError(
            f"dataset spec {spec.name!r}: column {missing[0]!r} named in the spec is not in the "
            f"{what} source {files[0].name} (columns: {', '.join(header)})"
        )
    return header


def read_raw(
    spark: SparkSession, spec: DatasetSpec, source: Path, part: SourceFile, what: str
) -> DataFrame:
    """All rows of the files matching ``part`` as string columns plus ``_corrupt_record`` (the raw
    line when it has the wrong number of fields) and ``_source`` (the file name)."""
    files = matching_files(spec, source, part, what)
    paths = [str(p) for p in files]
    order: list[Column] = []
    if what == "events" and spec.event_time.row_order:
        order = [
            F.col("_metadata.file_path").alias("_path"),
            F.col("_metadata.file_block_start").alias("_block"),
        ]
    if spec.format == "parquet":
        frame = spark.read.parquet(*paths)
        missing = [c for c in part.columns if c not in frame.columns]
        if missing:
            raise SpecError(
                f"dataset spec {spec.name!r}: column {missing[0]!r} named in the spec is not in "
                f"the {what} source (columns: {', '.join(frame.columns)})"
            )
        return frame.select(
            *[F.col(c).cast("string").alias(c) for c in part.columns],
            F.lit(None).cast("string").alias(CORRUPT),
            F.col("_metadata.file_name").alias(SOURCE),
            *order,
        )
    delimiter = "\t" if spec.format == "tsv" else ","
    columns = _file_columns(spec, files, part, delimiter, what)
    schema = T.StructType(
        [T.StructField(c, T.StringType()) for c in columns]
        + [T.StructField(CORRUPT, T.StringType())]
    )
    frame = spark.read.csv(
        paths,
        schema=schema,
        header=spec.header,
        sep=delimiter,
        mode="PERMISSIVE",
        columnNameOfCorruptRecord=CORRUPT,
        enforceSchema=True,
    )
    return frame.select(
        *[F.col(c) for c in part.columns],
        F.col(CORRUPT),
        F.col("_metadata.file_name").alias(SOURCE),
        *order,
    )
