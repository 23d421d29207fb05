"""report.json (everything the run decided, for tools) and report.md (the same for people)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from umo_core.files import atomic_path

from .embedding_pass import PassResult
from .identities import FaceId
from .rows import Row, Selection


@dataclass
class Decisions:
    """What the build decided, for the report."""

    targets: list[str]  # the collection's photos left after near-duplicates
    duplicates: dict[str, str]  # photo -> the earlier photo it nearly duplicates
    problems: dict[str, list[str | None]]  # photo -> per face, the filter it fails or None
    labels: dict[FaceId, str]
    selection: Selection
    training: list[Row]
    evaluation: list[Row]


def build_report(settings: dict, mode: str, cache: Path, found: int, skipped: list[str], collection: PassResult,
                 people: PassResult, people_left_out: dict[str, str], decided: Decisions) -> dict:
    """Everything the run decided (report.json); `found` counts the collection's image files, `people_left_out`
    the --people photos whose faces are not their folder's person."""
    target_problems = [problem for name in decided.targets for problem in decided.problems[name]]
    unknown = sum(1 for name in decided.targets for j, problem in enumerate(decided.problems[name])
                  if problem is None and (name, j) not in decided.labels)
    rows = decided.training + decided.evaluation
    held_out = {identity for row in decided.evaluation for identity in row.identities}
    identities = {}
    for identity, candidates in decided.selection.candidates.items():
        shown_in = [row for row in rows if identity in row.identities]
        used = Counter(row.references[row.identities.index(identity)][0] for row in shown_in)
        identities[identity] = {
            "split": "evaluation" if identity in held_out else "training" if shown_in else "unused",
            "photos": len({photo for photo, _ in candidates}), "faces": len(candidates), "rows": len(shown_in),
            "best_reference": candidates[0][0], "references": dict(sorted(used.items())),
        }
    return {
        "mode": mode,
        "settings": settings,
        "photos": {"found": found, "read": found - len(collection.unreadable), "unreadable": collection.unreadable,
                   "near_duplicates": decided.duplicates, "skipped_files": skipped},
        "people_photos_unreadable": people.unreadable,
        "people_photos_left_out": people_left_out,
        "embedding_cache": {"folder": str(cache), "computed": collection.computed + people.computed,
                            "cached": collection.cached + people.cached},
        "faces": {"found": len(target_problems), "usable": target_problems.count(None), "unknown": unknown,
                  "rejected": dict(Counter(p for p in target_problems if p is not None))},
        "identities": identities,
        "single_photo_identities": sorted(i for i, entry in identities.items() if entry["photos"] == 1),
        "rows": {"written": len(decided.training), "evaluation": len(decided.evaluation),
                 "same_photo_references": sum(row.same_photo for row in rows),
                 "rejected": dict(Counter(decided.selection.rejected.values()))},
        "rejected_photos": dict(sorted(decided.selection.rejected.items())),
    }


def write_report(folder: Path, report: dict) -> None:
    for name, text in (("report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
                       ("report.md", markdown(report))):
        with atomic_path(folder / name) as temporary:
            temporary.write_text(text, encoding="utf-8")


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
    if report["people_photos_left_out"]:
        lines += ["## People photos left out", "",
                  *(f"- {name}: {why}" for name, why in report["people_photos_left_out"].items()), ""]
    if photos["unreadable"]:
        lines += ["## Unreadable files", "", *(f"- {name}: {why}" for name, why in photos["unreadable"].items()), ""]
    if report["rejected_photos"]:
        lines += ["## Photos not used", "", *(f"- {name}: {why}" for name, why in report["rejected_photos"].items()),
                  ""]
    return "\n".join(lines)
