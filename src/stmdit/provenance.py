"""Where every output came from, and how it is written.

Each output carries `provenance(...)`: the stmdit version, the step, the exact parameters
and their hash, and the inputs. Every write goes to a temporary sibling first and is renamed
into place only when complete, so an interrupted job never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from stmdit import __version__

_TRACKED_PACKAGES = ("numpy", "torch", "scanpy", "anndata", "zarr", "opencv-python-headless")


def params_hash(params: dict[str, Any]) -> str:
    """Stable short hash of a parameter dict (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance(step: str, params: dict[str, Any], inputs: list[str | Path] | None = None) -> dict[str, Any]:
    """Metadata block recorded in every output (store attrs, JSON field, parquet footer)."""
    return {
        "stmdit_version": __version__,
        "step": step,
        "params": json.loads(json.dumps(params, default=str)),
        "params_hash": params_hash(params),
        "inputs": [str(p) for p in (inputs or [])],
        "packages": package_versions(),
    }


def _temp_sibling(path: Path) -> Path:
    """A hidden sibling with the same suffix (writers that choose a format by suffix still work)."""
    return path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")


def stale_temp_siblings(path: str | Path) -> list[Path]:
    """Temporary siblings of `path` left by a writer that was killed (SIGKILL, out of memory)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.stem)}\.tmp-[0-9a-f]{{8}}{re.escape(path.suffix)}")
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it into place, on error delete it.

    Works for files and for directories (Zarr stores): whatever the body creates at the
    yielded path replaces `path` in one rename. A writer killed outright (SIGKILL, the kernel's
    out-of-memory killer) cannot clean up: its hidden temporary is removed by the next write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_siblings(path):  # a killed earlier attempt: the rerun starts clean
        _remove(stale)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write of {path} produced nothing")
        if path.exists() and path.is_dir() and not path.is_symlink():
            old = _temp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_lines(path: str | Path, lines) -> None:
    """One line per item (an argument file that `stmdit ... @path` reads, one argument a line)."""
    lines = [str(line) for line in lines]
    bad = [line for line in lines if "\n" in line or "\r" in line]
    if bad:
        raise ValueError(f"{path}: an argument file cannot hold a line break: {bad[0]!r}")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def write_parquet(df, path: str | Path, meta: dict[str, Any]) -> None:
    """Write a DataFrame as parquet with `meta` stored as JSON in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    existing = table.schema.metadata or {}
    table = table.replace_schema_metadata({**existing, b"stmdit": json.dumps(meta, default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_provenance(path: str | Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(b"stmdit")
    return json.loads(raw) if raw else {}
