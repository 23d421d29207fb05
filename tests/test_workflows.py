"""The example workflows are well-formed UI-format graphs (no ComfyUI needed)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import ROOT

WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))

# Widget values per node type, as the editor saves them (a seed adds its "control after
# generate" value, LoadImage its upload button).
WIDGET_COUNTS = {
    "UMOFaceModelLoader": 3, "UMOReferenceIdentities": 0, "UMOIdentityRerank": 2, "UMOIdentityReport": 0,
    "UMOLoraLoader": 2, "UMOReferenceConditioning": 2,
    "UNETLoader": 2, "DualCLIPLoader": 4, "CLIPLoader": 3, "VAELoader": 1, "CLIPTextEncode": 1, "LoadImage": 2,
    "FluxGuidance": 1, "ConditioningZeroOut": 0, "EmptySD3LatentImage": 3, "KSampler": 7, "VAEDecode": 0,
    "SaveImage": 1, "PreviewImage": 0, "DualCFGGuider": 3, "RandomNoise": 2, "KSamplerSelect": 1,
    "BasicScheduler": 3, "SamplerCustomAdvanced": 0, "UMOIdentityFaceFix": 13, "Note": 1,
}
EXPECTED = {"umo_uno_single_identity", "umo_uno_two_identities", "umo_uno_two_identities_best_of_4",
            "umo_uno_two_identities_face_fix", "umo_omnigen2_multi_identity", "umo_identity_report"}
OFFICIAL_FILES = {"flux1-dev.safetensors", "UMO_UNO.safetensors", "ae.safetensors", "clip_l.safetensors",
                  "t5xxl_fp16.safetensors", "omnigen2_fp16.safetensors", "qwen_2.5_vl_fp16.safetensors",
                  "UMO_OmniGen2.safetensors"}


def test_the_six_workflows_with_thumbnails():
    assert {w.stem for w in WORKFLOWS} == EXPECTED
    for workflow in WORKFLOWS:
        thumbnail = workflow.with_suffix(".jpg")
        assert thumbnail.is_file()
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and min(image.size) >= 128


def test_official_model_files_are_named():
    used = set()
    for workflow in WORKFLOWS:
        for node in json.loads(workflow.read_text())["nodes"]:
            used.update(v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors"))
    assert used == OFFICIAL_FILES


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_graph_is_consistent(path):
    workflow = json.loads(path.read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] == max(nodes)
    links = {link[0]: link for link in workflow["links"]}
    assert len(links) == len(workflow["links"]) and workflow["last_link_id"] == max(links)
    for node in nodes.values():
        assert node["type"] in WIDGET_COUNTS, node["type"]
        assert len(node["widgets_values"]) == WIDGET_COUNTS[node["type"]], node["type"]
        for slot, socket in enumerate(node["inputs"]):
            if socket["link"] is not None:
                link_id, source, source_slot, target, target_slot, kind = links[socket["link"]]
                assert (target, target_slot) == (node["id"], slot)
                assert kind == socket["type"] == nodes[source]["outputs"][source_slot]["type"]
                assert link_id in nodes[source]["outputs"][source_slot]["links"]
        for socket in node["outputs"]:
            for link_id in socket["links"] or []:
                assert links[link_id][1] == node["id"] and links[link_id][2] == socket["slot_index"]
    used = {(link[3], link[4]) for link in links.values()}
    assert len(used) == len(links)  # one link per input
    orders = sorted(node["order"] for node in nodes.values())
    assert orders == list(range(len(nodes)))
