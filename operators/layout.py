"""Every path under an output prefix, in one place (docs/architecture.md).

    OUTPUT/
      videos/<id>.mp4, contact/<id>.png       files output: a row's video and contact sheet
      shards/<run>-<nnnnn>.tar, .json          webdataset output: a shard and its stats (operators/shards.py)
      metadata/part-<run>-<seq>.parquet        the metadata parts; a row is its video's commit marker
      report/index.html, report/videos/<id>.mp4  the run's report (jobs/report.py) and, with webdataset output, copies
                                               of the videos it shows (a browser cannot play a tar member)
      metadata/_corrupt/, shards/_corrupt/, videos/_corrupt/
                                               damaged objects set aside, never read (operators/integrity.py)
      export.json                              a filtered dataset's summary (jobs/export.py)
      _lease.json                              the lease of the driver writing the prefix (operators/lease.py)
      .staging/                                local files before their atomic rename (operators/storage.py)
      .runs/<run>/                             a run's scratch, never read as output: samples/ (finished samples
                                               before their shard is packed), timeouts/ (rows past their time),
                                               todo.parquet (the manifest rows left to run)

Paths are spelled as the prefix's filesystem spells them (the second value of `storage.filesystem`).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace

VIDEOS, CONTACT, SHARDS, METADATA, REPORT = "videos", "contact", "shards", "metadata", "report"
EXPORT, LEASE, STAGING, RUNS = "export.json", "_lease.json", ".staging", ".runs"
CORRUPT = "_corrupt"  # a folder beside damaged objects' own (operators/integrity.py)
PART = ("part-", ".parquet")  # a metadata part's name: prefix and suffix


def shard_name(uri: str) -> str:
    """A shard's name from its uri or path (`.../shards/<name>.tar`)."""
    return posixpath.basename(uri)[: -len(".tar")]


def is_part(path: str) -> bool:
    name = posixpath.basename(path)
    return name.startswith(PART[0]) and name.endswith(PART[1])


def video_href(rid: str, preview: bool = False) -> str:
    """The report page's link to a video, relative, so that the page works wherever the prefix is served: the row's
    own file (files output) or the report's copy of it (`preview`: webdataset output, `Layout.report_video`)."""
    target = posixpath.join(REPORT, VIDEOS) if preview else VIDEOS
    return posixpath.relpath(posixpath.join(target, f"{rid}.mp4"), REPORT)


@dataclass(frozen=True)
class Layout:
    """The paths under `root`; the scratch paths are those of `run` (`for_run`)."""

    root: str
    run: str = ""

    def at(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def for_run(self, run: str) -> "Layout":
        return replace(self, run=run)

    # -- output -------------------------------------------------------------------------------------------------
    @property
    def videos(self) -> str:
        return self.at(VIDEOS)

    @property
    def contact(self) -> str:
        return self.at(CONTACT)

    def video(self, rid: str) -> str:
        return self.at(VIDEOS, f"{rid}.mp4")

    def contact_sheet(self, rid: str) -> str:
        return self.at(CONTACT, f"{rid}.png")

    def media(self, rid: str, ext: str) -> str:
        """A files-output row's video (`mp4`) or contact sheet (`png`)."""
        return self.video(rid) if ext == "mp4" else self.contact_sheet(rid)

    @property
    def metadata(self) -> str:
        return self.at(METADATA)

    def part(self, tag: str, seq: int) -> str:
        return self.at(METADATA, f"{PART[0]}{tag}-{seq:05d}{PART[1]}")

    @property
    def shards(self) -> str:
        return self.at(SHARDS)

    def shard(self, name: str) -> str:
        return self.at(SHARDS, f"{name}.tar")

    def shard_stats(self, name: str) -> str:
        return self.at(SHARDS, f"{name}.json")

    @property
    def report(self) -> str:
        return self.at(REPORT, "index.html")

    def report_video(self, rid: str) -> str:
        """The report's copy of a webdataset row's video (`video_href(rid, preview=True)` links it)."""
        return self.at(REPORT, VIDEOS, f"{rid}.mp4")

    @property
    def export(self) -> str:
        return self.at(EXPORT)

    # -- bookkeeping ------------------------------------------------------------------------------------------------
    @property
    def lease(self) -> str:
        return self.at(LEASE)

    @property
    def staging(self) -> str:
        return self.at(STAGING)

    @property
    def runs(self) -> str:
        return self.at(RUNS)

    @property
    def scratch(self) -> str:
        """This run's scratch folder."""
        if not self.run:
            raise ValueError("a run's scratch path needs the run (Layout.for_run)")
        return self.at(RUNS, self.run)

    @property
    def samples(self) -> str:
        return posixpath.join(self.scratch, "samples")

    def sample(self, rid: str, ext: str) -> str:
        return posixpath.join(self.samples, f"{rid}.{ext}")

    @property
    def timeouts(self) -> str:
        return posixpath.join(self.scratch, "timeouts")

    def timeout_mark(self, rid: str) -> str:
        return posixpath.join(self.timeouts, f"{rid}.txt")

    @property
    def todo(self) -> str:
        return posixpath.join(self.scratch, "todo.parquet")
