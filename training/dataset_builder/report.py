"""report.json (everything the run decided, for tools) and report.md (the same for people)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(folder: Path, report: dict) -> None:
    for name, text in (("report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
                       ("report.md", markdown(report))):
        temporary = folder / (name + ".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, folder / name)


def _counts(title: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return [f"{title}: none", ""]
    return [f"{title}:", "", "| reason | count |", "|---|---:|",
            *(f"| {reason} | {count} |" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1])), ""]


def markdown(report: dict) -> str:
    photos, faces, rows, cache = report["photos"], report["faces"], report["rows"], report["embedding_cache"]
    lines = [
        "# Training data report (training.prepare_data)", "",
        f"- photos: {photos['found']} found, {photos['read']} read, {len(photos['unreadable'])} unreadable, "
        f"{len(photos['near_duplicates'])} near-duplicates left out, "
        f"{len(photos['skipped_files'])} other files skipped",
        f"- embedding cache `{cache['folder']}`: {cache['computed']} photos analysed now, "
        f"{cache['cached']} from the cache",
        f"- faces: {faces['found']} found, {faces['usable']} usable, {faces['unknown']} matched to nobody",
        f"- identities: {len(report['identities'])} ({report['mode']})",
        f"- rows: {rows['written']} training, {rows['evaluation']} evaluation "
        f"({rows['same_photo_references']} with references from their own photo)", "",
    ]
    lines += _counts("Faces rejected", faces["rejected"])
    lines += _counts("Photos not used as targets", rows["rejected"])
    if report["single_photo_identities"]:
        lines += ["Identities seen in one photo only (no reference from another photo): "
                  + ", ".join(report["single_photo_identities"]), ""]
    lines += ["## Identities", "", "| identity | split | photos | faces | rows | best reference | references used |",
              "|---|---|---:|---:|---:|---|---|"]
    for name, entry in report["identities"].items():
        used = ", ".join(f"{photo} ({count})" for photo, count in entry["references"].items()) or "-"
        lines.append(f"| {name} | {entry['split']} | {entry['photos']} | {entry['faces']} | {entry['rows']} | "
                     f"{entry['best_reference']} | {used} |")
    lines.append("")
    if photos["unreadable"]:
        lines += ["## Unreadable files", "", *(f"- {name}: {why}" for name, why in photos["unreadable"].items()), ""]
    if report["rejected_photos"]:
        lines += ["## Photos not used", "", *(f"- {name}: {why}" for name, why in report["rejected_photos"].items()),
                  ""]
    return "\n".join(lines)
