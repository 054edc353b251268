"""Read a run's output once and check it against what was committed: `python -m jobs.verify --output OUT [--repair]`.

Every metadata part is read whole; every committed video (files output) and shard (webdataset output) is streamed
once, in parallel, and its size and SHA-256 compared with its metadata row (`bytes`, `sha256`) and, for a shard, with
its stats file (`shards/<name>.json`: the whole tar's `bytes` and `sha256`) and every sample's mp4 with its row.
Prints one line per damaged or missing object and a summary line; exits 1 if anything is, 0 if not, 2 on bad input.
`--repair` sets the damaged objects aside (operators/integrity.py: `_corrupt/` beside them, under the output's lease)
so that the next run generates their rows again; a missing object needs nothing: the next run sees it is gone.

`--fraction F` checks the shards and videos of one bucket of about 1/F of them, the bucket chosen by the day
(`--day`, default today's UTC date), so that nightly runs with F = 1/7 cover a whole dataset once a week
(docs/reliability.md "Damage from outside"). Works on local paths and `s3://`; MLflow is not needed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import hashlib
import logging
import posixpath
import sys
import tarfile
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from operators import integrity, lease, metadata, resume, storage
from operators.integrity import Damage
from operators.layout import Layout, shard_name
from operators.shards import sample_key

logger = logging.getLogger(__name__)
COLUMNS = ("id", "status", "finished_at", "shard_uri", "bytes", "sha256")
CHUNK = 1 << 20  # bytes per streamed read


@dataclass(frozen=True)
class Finding:
    """A committed object that is `damaged` (its bytes differ from what was committed) or `missing`."""

    path: str
    what: str  # "metadata part", "shard", "video"
    problem: str  # "damaged" or "missing"
    reason: str


@dataclass
class Report:
    """What a verify read and found."""

    parts: int = 0
    videos: int = 0
    shards: int = 0
    bytes: int = 0
    findings: list[Finding] = field(default_factory=list)

    def count(self, problem: str) -> int:
        return sum(f.problem == problem for f in self.findings)

    @property
    def damage(self) -> list[Damage]:
        """The damaged objects, as operators/integrity.py sets them aside."""
        return [Damage(f.path, f.what, f.reason) for f in self.findings if f.problem == "damaged"]

    def summary(self) -> str:
        size = f"{self.bytes / 1e9:.2f} GB" if self.bytes >= 1e9 else f"{self.bytes / 1e6:.2f} MB"
        return (f"verified {self.parts} metadata part(s), {self.shards} shard(s) and {self.videos} video(s) "
                f"({size}): {self.count('damaged')} damaged, {self.count('missing')} missing")


def chosen(name: str, fraction: float, day: int) -> bool:
    """Whether `name` is in the bucket checked on `day` when a `fraction` of the objects is checked per day: the
    objects fall into round(1/fraction) buckets by a hash of their name, and day d checks bucket d mod that."""
    if fraction >= 1:
        return True
    buckets = max(1, round(1 / fraction))
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % buckets == day % buckets


class _Hashing:
    """A read-only stream that hashes and counts what passes through it (tarfile reads the shard through it)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def check_video(fs, path: str, size: int | None, sha: str | None) -> Finding | None:
    """Stream one video and compare it with its row."""
    try:
        with fs.open(path, "rb") as f:
            stream = _Hashing(f)
            stream.drain()
    except FileNotFoundError:
        return Finding(path, "video", "missing", "not there")
    if size is not None and stream.size != size:
        return Finding(path, "video", "damaged", f"it is {stream.size} bytes, its row says {size}")
    if sha and stream.sha.hexdigest() != sha:
        return Finding(path, "video", "damaged", "its SHA-256 differs from its row's")
    return None


def check_shard(fs, root: str, name: str, rows: list[dict]) -> tuple[int, Finding | None]:
    """Stream one shard: its size and SHA-256 against its stats, each of `rows`' mp4 against the row. Returns the bytes
    read and what is wrong (None if nothing)."""
    path = Layout(root).shard(name)
    stats, why = integrity.read_stats(fs, root, name)
    mp4, unreadable = {}, None
    try:
        with fs.open(path, "rb") as f:
            stream = _Hashing(f)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for info in tar:
                        key, _, ext = posixpath.basename(info.name).partition(".")
                        if ext == "mp4":
                            data = tar.extractfile(info).read()
                            mp4[key] = (len(data), hashlib.sha256(data).hexdigest())
            except tarfile.TarError as err:
                unreadable = f"it does not read as a tar ({integrity.one_line(err)})"
            stream.drain()
    except FileNotFoundError:
        return 0, Finding(path, "shard", "missing", f"not there ({len(rows)} committed sample(s))")
    if why is None and stream.size != stats["bytes"]:
        why = f"it is {stream.size} bytes, its stats say {stats['bytes']}"
    if why is None and stats.get("sha256") and stream.sha.hexdigest() != stats["sha256"]:
        why = "its SHA-256 differs from its stats'"
    why = why or unreadable
    if why is None:
        bad = [r["id"] for r in rows if mp4.get(sample_key(r["id"])) != (r["bytes"], r["sha256"])]
        if bad:
            why = f"{len(bad)} sample(s) differ from their rows or are absent ({', '.join(bad[:3])})"
    return stream.size, Finding(path, "shard", "damaged", why) if why else None


def verify(output: str, fraction: float = 1.0, day: int | None = None, workers: int = 8,
           progress: bool = False) -> Report:
    """Read `output` once (the shards and videos of the day's bucket when `fraction` < 1) and report what differs from
    its metadata and shard stats."""
    fs, root = storage.filesystem(output)
    day = dt.datetime.now(dt.timezone.utc).date().toordinal() if day is None else day
    report = Report()
    paths = metadata.part_paths(fs, root)
    report.parts = len(paths)
    bad_parts = integrity.part_damage(fs, paths)
    report.findings += [Finding(d.path, d.what, "damaged", d.reason) for d in bad_parts]
    bad = {d.path for d in bad_parts}
    table = metadata.latest(resume.scan(fs, root, COLUMNS, paths=[p for p in paths if p not in bad]))
    if table is None or not table.num_rows:
        return report
    table = table.filter(pc.equal(table["status"], "ok"))
    table = table.set_column(table.schema.get_field_index("shard_uri"), "shard_uri",
                             pc.cast(table["shard_uri"], pa.string()))
    rows = table.select(["id", "shard_uri", "bytes", "sha256"]).to_pylist()
    layout = Layout(root)
    videos = [r for r in rows if not r["shard_uri"] and chosen(r["id"], fraction, day)]
    by_shard: dict[str, list[dict]] = {}
    for r in rows:
        if r["shard_uri"]:
            by_shard.setdefault(shard_name(r["shard_uri"]), []).append(r)
    by_shard = {n: rs for n, rs in by_shard.items() if chosen(n, fraction, day)}
    report.videos, report.shards = len(videos), len(by_shard)

    def one_video(r: dict) -> tuple[int, Finding | None]:
        found = check_video(fs, layout.video(r["id"]), r["bytes"], r["sha256"])
        return (0 if found and found.problem == "missing" else r["bytes"] or 0), found

    from tqdm.auto import tqdm

    with cf.ThreadPoolExecutor(workers) as pool, tqdm(total=len(videos) + len(by_shard), unit="object",
                                                      desc="verify", file=sys.stderr, disable=not progress) as bar:
        futures = [pool.submit(one_video, r) for r in videos]
        futures += [pool.submit(check_shard, fs, root, n, rs) for n, rs in by_shard.items()]
        for future in cf.as_completed(futures):
            size, found = future.result()
            report.bytes += size
            if found:
                report.findings.append(found)
            bar.update(1)
    report.findings.sort(key=lambda f: f.path)
    return report


def repair(output: str, report: Report) -> list[str]:
    """Set the damaged objects aside under the output's lease (a running job on it makes this refuse)."""
    fs, root = storage.filesystem(output)
    held = lease.Lease(fs, root, "jobs.verify --repair", ttl_s=300).acquire()
    try:
        return integrity.set_aside(fs, root, report.damage)
    finally:
        held.release()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="the run's output folder or object-store prefix (s3://...)")
    p.add_argument("--repair", action="store_true",
                   help="set damaged objects aside (_corrupt/ beside them) so that the next run generates their rows")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="check one bucket of about this fraction of the shards and videos, chosen by --day "
                        "(1/7: the whole output once a week); default 1: everything")
    p.add_argument("--day", type=int, default=None, help="the day number that picks the bucket (default: today, UTC)")
    p.add_argument("--workers", type=int, default=8, help="objects read in parallel (default 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 < args.fraction <= 1 or args.workers < 1:
        print("error: --fraction must be in (0, 1] and --workers at least 1", file=sys.stderr)
        return 2
    fs, root = storage.filesystem(args.output)
    if not fs.exists(Layout(root).metadata):
        print(f"error: --output: {args.output!r} holds no metadata/ (not a run's output?)", file=sys.stderr)
        return 2
    report = verify(args.output, args.fraction, args.day, args.workers, progress=sys.stderr.isatty())
    for f in report.findings:
        print(f"{f.problem:<8} {f.what} {storage.full_uri(fs, f.path)}: {f.reason}")
    print(report.summary())
    if args.repair and report.damage:
        try:
            repair(args.output, report)
        except lease.LeaseHeld as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"set aside {len(report.damage)} object(s) in _corrupt/ folders: the next run on this output generates "
              "their rows again")
    return 1 if report.findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
