"""A static HTML report of a run folder: gallery, A/B pairs side by side with their scores, contact sheets,
and score-distribution plots per sampler. Written to OUTPUT/report/index.html; images are inlined (data URIs),
videos are linked relatively (`../videos/<id>.mp4`; with webdataset output, copies of the shown rows' videos under
`report/videos/`, within a size cap, as a browser cannot play a member of a tar), so the page works wherever the output
prefix is served."""
from __future__ import annotations

import base64
import html
import io
import logging
import posixpath
import tempfile
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from operators import storage
from operators.layout import REPORT, VIDEOS, Layout, video_href
from operators.resume import media
from pipelines.metrics import SCORES

logger = logging.getLogger(__name__)
MAX_ROWS = 300  # gallery cap: inlined contact sheets keep the page self-contained, and bounded
STYLE = ("body { font-family: sans-serif; margin: 1.5em; } .row { display: flex; gap: 1em; flex-wrap: wrap; }\n"
         ".card { border: 1px solid #ccc; padding: .5em; max-width: 560px; } "
         ".contact { display: block; max-width: 540px; margin-top: .3em; }\n"
         ".score { margin-right: 1em; font-family: monospace; } .error { color: #b00; } .prompt { color: #333; }\n"
         "table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .2em .6em; }\n"
         ".diff { white-space: nowrap; font-family: monospace; }")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def score_plots(rows: list[dict]) -> dict[str, bytes]:
    """One PNG per score: its distribution per sampler (box plot with the points)."""
    import matplotlib  # heavy, and its backend must be chosen before pyplot loads: only the report needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    samplers = sorted({r["sampler"] for r in rows if r.get("sampler")})
    for name in SCORES:
        data = [[r[name] for r in rows if r.get("sampler") == s and r.get(name) is not None] for s in samplers]
        if not any(data):
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(samplers), 3.2), dpi=100)
        ax.boxplot([d or [float("nan")] for d in data], tick_labels=samplers, showmeans=True)
        for k, d in enumerate(data, start=1):
            ax.scatter([k] * len(d), d, s=10, alpha=0.6)
        ax.set_title(f"{name}\n({'higher' if name != 'flicker' else 'lower'} is better)", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        plots[name] = buf.getvalue()
    return plots


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _card(r: dict, contact: str | None, href: str | None) -> str:
    scores = " ".join(f"<span class='score'>{n}: {_fmt(r.get(n))}</span>" for n in SCORES)
    video = (f"<video src='{html.escape(href)}' controls muted loop preload='metadata' "
             f"width='{r.get('width') or 256}'></video>") if href else ""
    img = f"<img class='contact' alt='contact sheet of {html.escape(r['id'])}' src='{contact}'>" if contact else ""
    err = f"<p class='error'>{html.escape(r.get('error') or '')}</p>" if r["status"] != "ok" else ""
    return (f"<div class='card'><h4>{html.escape(r['id'])} <small>{_fmt(r.get('sampler'))} · "
            f"seed {_fmt(r.get('seed'))}</small></h4><p class='prompt'>{html.escape(r.get('prompt') or '')}</p>"
            f"{video}{img}<p>{scores}</p>{err}</div>")


def _export_section(export: dict | None) -> str:
    """The filtered dataset this run exported (config `export`), linked."""
    if not export:
        return ""
    to = html.escape(export["to"])
    return (f"<h2>Filtered dataset</h2><p id='export'><a href='{to}'>{to}</a>: {export['rows']} of "
            f"{export['ok_rows']} ok videos ({html.escape(export['describe'])}), {export['format']}, "
            f"{len(export['shards'])} shard(s)</p>")


def _calls(stats: dict) -> str:
    """Model calls per video of a sampler group (a mean: rows may set their own interval)."""
    calls = stats.get("calls_mean")
    return "—" if calls is None else f"{calls:.4g}"


def paired_section(paired: dict, groups: dict, reference: str) -> str:
    """Every sampler against the reference, A/B group by A/B group (jobs/paired.py): its cost per video first (so that
    equal-compute comparisons read off one row), then per score the mean difference with its bootstrap 95 % interval
    and the win rate (docs/lab.md "Reading the comparison")."""
    if not paired:
        return ""
    scores = [n for n in SCORES if any(n in s for s in paired.values())]
    heads = "".join(f"<th>Δ {n}<br><small>[95% CI] · wins</small></th>" for n in scores)

    def cost(name: str) -> str:
        g = groups.get(name, {})
        return f"<td>{_calls(g)}</td><td>{_fmt(g.get('tflop_mean'))}</td>"

    def cell(d) -> str:
        return (f"<td class='diff'>{d.mean:+.4f} <small>[{d.lo:+.4f}, {d.hi:+.4f}]</small> · "
                f"<span class='win'>{d.win_rate:.0%}</span></td>")

    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{max(d.n for d in per.values())}</td>{cost(name)}"
        + "".join(cell(per[n]) if n in per else "<td>—</td>" for n in scores) + "</tr>"
        for name, per in sorted(paired.items()))
    ref_row = (f"<tr><td>{html.escape(reference)} <small>(reference)</small></td><td>—</td>{cost(reference)}"
               + "<td>—</td>" * len(scores) + "</tr>")
    return (f"<h2>Against {html.escape(reference)} (paired by A/B group)</h2>"
            f"<p>Each score: the sampler's minus {html.escape(reference)}'s on the same prompt, seed and initial "
            "noise, averaged over the groups where both videos are ok, with a bootstrap 95 % interval over groups, "
            "then the share of groups where the sampler does better (lower flicker, higher otherwise; a tie counts "
            "half).</p>"
            f"<table id='paired'><tr><th>sampler</th><th>groups</th><th>calls / video</th><th>TFLOP / video</th>"
            f"{heads}</tr>{body}{ref_row}</table>")


def build_html(rows: list[dict], contacts: dict[str, str], videos: dict[str, str], plots: dict[str, bytes], title: str,
               groups: dict, export: dict | None = None, paired: dict | None = None,
               reference: str = "standard") -> str:
    """The page; `contacts` and `videos` map a row id to its contact sheet (data URI) and its video link."""
    pairs = defaultdict(list)
    for r in rows:
        if r.get("pair_id"):
            pairs[r["pair_id"]].append(r)
    summary = "".join(
        f"<tr><td>{html.escape(g)}</td><td>{int(s['n'])}</td><td>{s['success_rate']:.0%}</td>"
        + "".join(f"<td>{_fmt(s.get(n + '_mean'))}</td>" for n in SCORES)
        + f"<td>{_calls(s)}</td><td>{_fmt(s.get('tflop_mean'))}</td></tr>" for g, s in groups.items())
    ab = "".join(
        f"<section class='pair'><h3>{html.escape(pid)}</h3><div class='row'>"
        + "".join(_card(r, contacts.get(r["id"]), videos.get(r["id"]))
                  for r in sorted(rs, key=lambda r: r.get("sampler") or ""))
        + "</div></section>"
        for pid, rs in sorted(pairs.items()))
    gallery = "".join(_card(r, contacts.get(r["id"]), videos.get(r["id"])) for r in rows if not r.get("pair_id"))
    plot_imgs = "".join(f"<img class='plot' alt='{n} per sampler' src='{_data_uri(b, 'image/png')}'>"
                        for n, b in plots.items())
    heads = "".join(f"<th>{n} (mean)</th>" for n in SCORES) + "<th>calls / video</th><th>TFLOP / video</th>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
{STYLE}
</style></head><body>
<h1>{html.escape(title)}</h1>
<h2>Summary per sampler</h2>
<table><tr><th>sampler</th><th>videos</th><th>success</th>{heads}</tr>{summary}</table>
{paired_section(paired or {}, groups, reference)}
{_export_section(export)}
<h2>Score distributions</h2><div class="row">{plot_imgs}</div>
<h2>A/B pairs (same prompt, seed and initial noise)</h2>{ab or '<p>none</p>'}
<h2>Gallery</h2><div class="row">{gallery or '<p>none</p>'}</div>
<div id="media-status" data-state="pending"></div>
<script>
// records whether every video and image resolved (for headless checks)
window.addEventListener('load', async () => {{
  const vids = [...document.querySelectorAll('video')];
  const ready = v => v.readyState >= 1 ? Promise.resolve(true) : new Promise(res => {{
    v.addEventListener('loadedmetadata', () => res(true), {{once: true}});
    v.addEventListener('error', () => res(false), {{once: true}});
    setTimeout(() => res(v.readyState >= 1), 8000);
  }});
  const okVids = (await Promise.all(vids.map(ready))).filter(Boolean).length;
  const imgs = [...document.images];
  const okImgs = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const s = document.getElementById('media-status');
  s.dataset.videos = `${{okVids}}/${{vids.length}}`;
  s.dataset.images = `${{okImgs}}/${{imgs.length}}`;
  s.dataset.state = (okVids === vids.length && okImgs === imgs.length) ? 'ok' : 'missing';
  s.textContent = `videos ${{okVids}}/${{vids.length}}, images ${{okImgs}}/${{imgs.length}}`;
}});
</script>
</body></html>
"""


def display_order(table: pa.Table):
    """Row indices in the report's order: A/B pairs by pair id (rows without one first), then by id."""
    pair = table["pair_id"] if "pair_id" in table.column_names else pa.nulls(table.num_rows, pa.string())
    keys = pa.table({"pair": pc.fill_null(pair, ""), "id": table["id"]})
    return pc.sort_indices(keys, sort_keys=[("pair", "ascending"), ("id", "ascending")])


def write_report(fs, root: str, table: pa.Table, groups: dict, title: str, export: dict | None = None, *,
                 paired: dict | None = None, reference: str = "standard") -> str:
    """Write OUTPUT/report/index.html for the current metadata (and `paired`, every sampler against `reference`:
    jobs/paired.py); returns its path."""
    rows = table.take(display_order(table)[:MAX_ROWS]).to_pylist()
    contacts = {}
    for r in rows:
        png = media(fs, root, r, "png") if r["status"] == "ok" else None
        if png:
            contacts[r["id"]] = _data_uri(png, "image/png")
    page = build_html(rows, contacts, video_links(fs, root, rows), score_plots(rows), title, groups, export, paired,
                      reference)
    dest = Layout(root).report
    storage.put_bytes(fs, page.encode(), dest, root)
    ok = sum(r["status"] == "ok" for r in rows)
    logger.info("report: %s (%d videos, %d failed ids; the report shows one row per id)", storage.full_uri(fs, dest),
                ok, len(rows) - ok)
    return dest


def video_links(fs, root: str, rows: list[dict]) -> dict[str, str]:
    """Row id -> the report's link to its video: the row's own file, or for a webdataset row a copy under
    `report/videos/` (written here, within `report_videos`' cap; a row past it shows its contact sheet alone)."""
    links = {r["id"]: video_href(r["id"]) for r in rows if r["status"] == "ok" and not r.get("shard_uri")}
    layout = Layout(root)
    for r in report_videos(rows):
        if r.get("shard_uri"):
            data = media(fs, root, r, "mp4")
            if data:
                storage.put_bytes(fs, data, layout.report_video(r["id"]), root)
                links[r["id"]] = video_href(r["id"], preview=True)
    return links


def report_videos(rows: list[dict], cap_bytes: int = 256 << 20) -> list[dict]:
    """The ok rows among the report's whose videos are copied for it (webdataset output: under report/videos/; in
    MLflow, every format: beside the report, so its relative links resolve there), within a size cap."""
    total, out = 0, []
    for r in rows:
        if r["status"] == "ok" and r.get("bytes"):
            if total + r["bytes"] > cap_bytes:
                break
            total += r["bytes"]
            out.append(r)
    return out


def log_report(mlflow, fs, root: str, path: str, table: pa.Table) -> None:
    """The report and (within a cap) the videos it links, under report/ and videos/ in the run's artifacts: the
    output's layout, so that the report's relative links resolve there too."""
    with tempfile.TemporaryDirectory() as tmp:
        local = posixpath.join(tmp, posixpath.basename(path))
        fs.get_file(path, local)
        mlflow.log_artifact(local, REPORT)
        for row in report_videos(table.take(display_order(table)[:MAX_ROWS]).to_pylist()):
            dst = posixpath.join(tmp, f"{row['id']}.mp4")
            with open(dst, "wb") as f:
                f.write(media(fs, root, row, "mp4") or b"")
            # where the page links it: ../videos/ (files output) or report/videos/ (webdataset output)
            mlflow.log_artifact(dst, posixpath.join(REPORT, VIDEOS) if row.get("shard_uri") else VIDEOS)
