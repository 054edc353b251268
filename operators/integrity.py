"""Damage from outside (docs/reliability.md "Damage from outside"): what a rerun finds broken under an output prefix,
and how it is set aside so that its rows are generated again.

The job never writes a partial object, but a prefix lives for months and other tools touch it: a copy cut short, a
sync, a lifecycle rule, a disk error, a hand. Every run checks what is cheap (`committed` in operators/resume.py):

- a metadata part that does not open is not read (its rows count as not done; their ids and keys are the same, so
  nothing is duplicated when they are made again);
- a shard whose stats file is missing or does not parse, or whose size differs from the `bytes` its stats committed,
  is not done, and neither is any sample in it (a shard is written whole, so it is made again whole);
- a video (files output) whose size differs from its row's `bytes` is not done.

Under the output's lease, `set_aside` moves each such object to a `_corrupt/` folder beside it (`metadata/_corrupt/`,
`shards/_corrupt/`, `videos/_corrupt/`), with one warning naming it. What a size cannot show (bit rot of the same
length) is found by reading everything once: `python -m jobs.verify` (jobs/verify.py).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Iterable

from . import storage
from .layout import CORRUPT, Layout, shard_name

logger = logging.getLogger(__name__)
THREADS = 16  # parallel small reads (stats files, part footers): an object store answers each in tens of ms
NAMED = 20  # damaged objects named one warning each; past this, one line counts the rest


@dataclass(frozen=True)
class Damage:
    """A committed object that cannot be trusted: `path` as the prefix's filesystem spells it, `what` it is
    ("metadata part", "shard", "video"), `reason` one readable line."""

    path: str
    what: str
    reason: str


def part_damage(fs, paths: Iterable[str], columns: Iterable[str] | None = None) -> list[Damage]:
    """The metadata parts among `paths` that do not read (footer and `columns`, every column when None), read in
    parallel."""
    wanted = list(columns) if columns is not None else None

    def check(path: str) -> Damage | None:
        try:
            storage.read_parquet(fs, path, wanted)
        except FileNotFoundError:
            return None  # gone since it was listed: nothing to set aside
        except Exception as err:  # pyarrow raises ArrowInvalid/OSError for cut or garbled files
            return Damage(path, "metadata part", f"unreadable ({one_line(err)})")
        return None

    with cf.ThreadPoolExecutor(THREADS) as pool:
        return [d for d in pool.map(check, list(paths)) if d is not None]


def read_stats(fs, root: str, name: str) -> tuple[dict | None, str | None]:
    """A shard's stats (`shards/<name>.json`) and None, or None and why it cannot be trusted."""
    path = Layout(root).shard_stats(name)
    try:
        stats = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None, "its stats file is missing"
    except (ValueError, UnicodeDecodeError) as err:
        return None, f"its stats file does not parse ({one_line(err)})"
    if not isinstance(stats, dict) or not isinstance(stats.get("bytes"), int):
        return None, "its stats file has no byte count"
    return stats, None


def shard_damage(fs, root: str, names: Iterable[str], sizes: dict[str, int]) -> list[Damage]:
    """The shards among `names` (present on disk, `sizes` from the listing) whose stats are missing or unreadable or
    whose size differs from the stats' `bytes`: one small read per shard, in parallel."""
    layout = Layout(root)

    def check(name: str) -> Damage | None:
        stats, why = read_stats(fs, root, name)
        if why is None and stats["bytes"] != sizes[name]:
            why = f"it is {sizes[name]} bytes, its stats say {stats['bytes']}"
        return Damage(layout.shard(name), "shard", why) if why else None

    with cf.ThreadPoolExecutor(THREADS) as pool:
        return [d for d in pool.map(check, sorted(names)) if d is not None]


def aside(path: str) -> str:
    """Where `set_aside` moves an object: `_corrupt/` in its own folder."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, CORRUPT, name)


def set_aside(fs, root: str, damage: Iterable[Damage]) -> list[str]:
    """Move each damaged object (a shard with its stats) into `_corrupt/` beside it, with one warning naming it; only
    under the output's lease (one writer). Returns the paths moved. An object already gone is skipped."""
    moved = []
    damage = list(damage)
    for i, d in enumerate(damage):
        paths = [d.path]
        if d.what == "shard":
            paths.append(Layout(root).shard_stats(shard_name(d.path)))
        for path in paths:
            if not fs.exists(path):
                continue
            fs.makedirs(posixpath.dirname(aside(path)), exist_ok=True)
            fs.mv(path, aside(path))
            moved.append(path)
        if i < NAMED:
            logger.warning("%s %s: %s; moved to %s; the rows it holds will be generated again", d.what,
                           posixpath.relpath(d.path, root), d.reason, posixpath.relpath(aside(d.path), root))
    if len(damage) > NAMED:
        logger.warning("%d more damaged object(s) moved to _corrupt/ folders; their rows will be generated again",
                       len(damage) - NAMED)
    return moved


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
