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
    "EmptyFlux2LatentImage": 3, "Flux2Scheduler": 3, "CFGGuider": 1, "UMOIdentityGuidance": 5,
}
EXPECTED = {"umo_uno_single_identity", "umo_uno_two_identities", "umo_uno_two_identities_best_of_4",
            "umo_uno_two_identities_face_fix", "umo_omnigen2_multi_identity", "umo_identity_report",
            "umo_flux2_klein_two_identities_best_of_4", "umo_flux2_klein_identity_guidance"}
# The released files as people download them (FLUX.2 [klein]: Comfy-Org/flux2-klein and its text encoder, Comfy-Org's
# FLUX.2 VAE; the names ComfyUI's own FLUX.2 [klein] templates use).
OFFICIAL_FILES = {"flux1-dev.safetensors", "UMO_UNO.safetensors", "ae.safetensors", "clip_l.safetensors",
                  "t5xxl_fp16.safetensors", "omnigen2_fp16.safetensors", "qwen_2.5_vl_fp16.safetensors",
                  "UMO_OmniGen2.safetensors", "flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors",
                  "flux2-vae.safetensors"}
FLUX2_LOADERS = {"UNETLoader": ["flux-2-klein-4b.safetensors", "default"],
                 "CLIPLoader": ["qwen_3_4b.safetensors", "flux2", "default"], "VAELoader": ["flux2-vae.safetensors"]}
GROUPS = ["The people", "Generation", "Identity check"]


def test_the_workflows_with_thumbnails():
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


@pytest.mark.parametrize("path", [w for w in WORKFLOWS if w.stem.startswith("umo_flux2_")], ids=lambda p: p.stem)
def test_flux2_workflows_use_comfyuis_own_flux2_loaders(path):
    """UNETLoader with the [klein] file, CLIPLoader of type flux2 with Qwen3-4B, VAELoader with FLUX.2's VAE; the
    references reach UMO Reference Conditioning (backbone auto, long_side 0) and the identities."""
    nodes = json.loads(path.read_text())["nodes"]
    loaders = {node["type"]: node["widgets_values"] for node in nodes if node["type"] in FLUX2_LOADERS}
    assert loaders == FLUX2_LOADERS
    conditioning = next(node for node in nodes if node["type"] == "UMOReferenceConditioning")
    assert conditioning["widgets_values"] == ["auto", 0]
    assert [s["link"] is not None for s in conditioning["inputs"] if s["name"].startswith("image_")] == [
        True, True, False, False]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_layout_reads_left_to_right_in_titled_groups(path):
    """The titled groups in order from the top, every node but the Note inside one, links going rightwards within a
    group, and a Note naming every model file the graph loads."""
    workflow = json.loads(path.read_text())
    groups = workflow["groups"]
    titles = [group["title"] for group in sorted(groups, key=lambda g: g["bounding"][1])]
    assert titles[:2] == GROUPS[:2] and titles == [title for title in GROUPS if title in titles]

    def group_of(node: dict) -> str | None:
        x, y = node["pos"]
        for group in groups:
            left, top, width, height = group["bounding"]
            if left <= x and x + node["size"][0] <= left + width and top <= y and y + node["size"][1] <= top + height:
                return group["title"]
        return None

    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in nodes.values():
        assert (group_of(node) is None) == (node["type"] == "Note"), node["type"]
    for _, source, _, target, _, _ in workflow["links"]:
        if group_of(nodes[source]) == group_of(nodes[target]):
            assert nodes[source]["pos"][0] < nodes[target]["pos"][0], (nodes[source]["type"], nodes[target]["type"])
    note = next(node["widgets_values"][0] for node in nodes.values() if node["type"] == "Note")
    files = {v for node in nodes.values() for v in node["widgets_values"]
             if isinstance(v, str) and v.endswith(".safetensors")}
    assert all(name in note for name in files)
