"""Write a result as JSON + Markdown (+ ROC curves as PNG). Figures are written as measured, never edited."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np

from training.attacks.library import long_name
from training.metrics import roc


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path | io.BytesIO, title: str
             ) -> Path | io.BytesIO | None:
    """One ROC curve per (clean scores, adversarial scores) pair; pairs with an empty side are skipped."""
    drawable = {k: v for k, v in curves.items() if len(v[0]) and len(v[1])}
    if not drawable:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (clean, adversarial) in drawable.items():
        fpr, tpr, _ = roc(clean, adversarial)
        ax.plot(fpr, tpr, label=f"{name} (n={len(clean)}/{len(adversarial)})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    for x, style in ((0.05, "--"), (0.10, "-.")):
        ax.axvline(x, color="black", lw=0.6, ls=style)  # the SR@5% and TPR@90%TNR operating points
    ax.set(xlabel="false positive rate (clean flagged)", ylabel="true positive rate (attacks detected)",
           title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    ci = row.get(f"{key}_ci95")
    if ci and all(isinstance(c, (int, float)) and not math.isnan(c) for c in ci):  # None: NaN read back from JSON
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text


def markdown(result: dict, columns: list[tuple[str, str]]) -> str:
    """`columns`: (row key, header) pairs; rows that did not run show their `status`. Next to a short `attack` key
    the table also shows its readable name (`training.attacks.long_name`)."""
    if ("attack", "attack") in columns:
        at = columns.index(("attack", "attack")) + 1
        columns = columns[:at] + [("what", "what")] + columns[at:]
        result = {**result, "rows": [{**row, "what": long_name(row["attack"])} for row in result["rows"]]}
    lines = [f"# {result['title']}", ""]
    lines += [f"- scale: `{result['scale']['name']}` — {json.dumps(result['scale'])}",
              f"- data: {json.dumps(result.get('data', {}))}", f"- command: `{result.get('command', '')}`"]
    lines += [f"- {note}" for note in result.get("notes", [])]
    flags = result.get("sanity_flags", [])
    lines += ["", f"**SANITY FLAGS ({len(flags)})**: " + ("none" if not flags else "")]
    lines += [f"- **{f['flag']}**: {f['message']}" for f in flags]
    if result.get("summary_md"):  # e.g. the security report's strongest attack and robustness ceiling
        lines += ["", result["summary_md"]]
    lines += ["", "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        if row.get("status", "ok") != "ok":
            cells = [fmt(row, k) if k in ("defence", "detector", "attack", "what", "layers", "cushion", "layer") else "–"
                     for k, _ in columns]
            cells[-1] = row["status"]
        else:
            cells = [fmt(row, k) for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Intervals: 95% percentile bootstrap (clean and adversarial resampled independently)."]
    return "\n".join(lines) + "\n"


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def render_result(result: dict, stem: str, columns: list[tuple[str, str]], curves: dict | None = None
                  ) -> dict[str, bytes]:
    """{file name: content}: `<stem>.json`, `<stem>.md` and, when curves are given, `<stem>_roc.png`."""
    files = {}
    if curves:
        png = plot_roc(curves, io.BytesIO(), result["title"][:60])
        if png is not None:
            result["roc_plot"] = f"{stem}_roc.png"
            files[result["roc_plot"]] = png.getvalue()
    return {f"{stem}.json": (json.dumps(_jsonable(result), indent=2) + "\n").encode(),
            f"{stem}.md": markdown(result, columns).encode(), **files}


def write_result(result: dict, out: Path, stem: str, columns: list[tuple[str, str]],
                 curves: dict | None = None) -> list[Path]:
    """`render_result`'s files written into the folder `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render_result(result, stem, columns, curves).items():
        (out / name).write_bytes(content)
        written.append(out / name)
    return written
