"""Every example workflow converts from the editor's UI format to API format against the live
/object_info and passes ComfyUI's own /prompt validation; the identity report one also runs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note"}  # the editor's own nodes: not in /object_info, left out of the API format


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the editor's "Save (API)" does: widget values by input order, links as [node, slot]."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]
        linked = {s["name"]: links[s["link"]] for s in node["inputs"] if s.get("link") is not None}
        values = iter(node["widgets_values"])
        inputs = {}
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, spec in specs.items():
            if _is_widget(spec):
                value = next(values)
                options = spec[1] if len(spec) > 1 else {}
                if options.get("control_after_generate") or options.get("image_upload"):
                    next(values)  # the editor's extra widget value (seed control, upload button)
                inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        assert next(values, None) is None, f"{node['type']} has more widget values than inputs"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_in_comfyui(comfy, path):
    prompt = ui_to_api(json.loads(path.read_text()), comfy.get("/object_info"))
    # run() fails unless /prompt accepts the graph, which ComfyUI only does after validating every input.
    # The generation graphs then stop at the empty placeholder model files.
    history = comfy.run(prompt)
    if path.stem == "umo_identity_report":
        assert history["status"]["status_str"] == "success", history["status"]
        report = "".join(next(o["text"] for o in history["outputs"].values() if "text" in o))
        assert "R1->face 1" in report


def test_workflows_are_listed_under_browse_templates(comfy):
    listed = comfy.get("/api/workflow_templates")["comfyui-umo"]
    assert sorted(listed) == sorted(path.stem for path in WORKFLOWS)
