"""Every example workflow converts from the editor's UI format to API format against the live
/object_info and passes ComfyUI's own /prompt validation; the identity report one also runs, and so do the FLUX.2
[klein] ones where ComfyUI builds a small FLUX.2 file as it says (0.12.1), with tiny stand-ins for the model files."""

from __future__ import annotations

import json

import pytest

from tests.comfyui.conftest import FLUX2_NEEDED
from tests.conftest import ROOT
from tests.flux2_layout import KLEIN_4B_TEXT_WIDTH

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
FLUX2_WORKFLOWS = [path for path in WORKFLOWS if path.stem.startswith("umo_flux2_")]
FLUX2_NODES = ("EmptyFlux2LatentImage", "Flux2Scheduler")  # and CLIPLoader's type flux2
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


def flux2_nodes_missing(object_info: dict) -> list[str]:
    """The FLUX.2 nodes the [klein] workflows use that this ComfyUI lacks (0.3.64 has none)."""
    missing = [name for name in FLUX2_NODES if name not in object_info]
    spec = object_info["CLIPLoader"]["input"]["required"]["type"]  # [options] or ["COMBO", {"options": ...}]
    if "flux2" not in (spec[0] if isinstance(spec[0], list) else spec[1]["options"]):
        missing.append("CLIPLoader type flux2")
    return missing


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_validates_in_comfyui(comfy, path):
    object_info = comfy.get("/object_info")
    if path in FLUX2_WORKFLOWS and flux2_nodes_missing(object_info):
        pytest.skip(f"this ComfyUI has no {', '.join(flux2_nodes_missing(object_info))}; {FLUX2_NEEDED}")
    prompt = ui_to_api(json.loads(path.read_text()), object_info)
    # run() fails unless /prompt accepts the graph, which ComfyUI only does after validating every input.
    # The generation graphs then stop at the empty placeholder model files.
    history = comfy.run(prompt)
    if path.stem == "umo_identity_report":
        assert history["status"]["status_str"] == "success", history["status"]
        report = "".join(next(o["text"] for o in history["outputs"].values() if "text" in o))
        assert "R1->face 1" in report


@pytest.mark.parametrize("path", FLUX2_WORKFLOWS, ids=lambda p: p.stem)
def test_flux2_workflow_runs_with_tiny_stand_ins(comfy, flux2_files, path):
    """The template's own graph, run: only the model files become the tiny FLUX.2 transformer and FLUX.2's autoencoder
    (random weights), the text encoder (Qwen3-4B cannot run here) a fixed embedding of its width, and the image 64 x 64
    in 2 steps. References, sampler chain, identity nodes and their settings are the template's."""
    prompt = ui_to_api(json.loads(path.read_text()), comfy.get("/object_info"))
    transformer, vae = flux2_files
    for node_id, node in list(prompt.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inputs["unet_name"] = transformer
        elif kind == "VAELoader":
            inputs["vae_name"] = vae
        elif kind == "CLIPLoader":
            del prompt[node_id]
        elif kind == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "UMOTestTextEmbedding",
                               "inputs": {"seed": 0, "width": KLEIN_4B_TEXT_WIDTH}}
        elif kind in ("EmptyFlux2LatentImage", "Flux2Scheduler"):
            inputs.update(width=64, height=64)
            if kind == "Flux2Scheduler":
                inputs["steps"] = 2
    history = comfy.run(prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    saved = [output for output in history["outputs"].values() if "images" in output]
    assert saved and all(image["filename"].endswith(".png") for output in saved for image in output["images"])


def test_workflows_are_listed_under_browse_templates(comfy):
    listed = comfy.get("/api/workflow_templates")["comfyui-umo"]
    assert sorted(listed) == sorted(path.stem for path in WORKFLOWS)
