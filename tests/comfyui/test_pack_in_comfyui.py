"""The pack inside a real ComfyUI: registration, identity workflows, the FLUX graph, Cancel."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PHOTOS
from tests.flux2_layout import KLEIN_4B_TEXT_WIDTH
from umo_core.faces.scoring import DOUBTFUL_MARK

# Small references keep the full-width FLUX block fast on a CPU (UNO's 320 px rule is tested in process).
REFERENCE_LONG_SIDE = 128
PACK_NODES = {
    "UMOFaceModelLoader": (["face_pack", "provider", "embedder"], ["UMO_FACE_MODEL"]),
    "UMOReferenceIdentities": (["face_model", "images", "image_1", "image_2", "image_3", "image_4"],
                               ["UMO_IDENTITIES", "IMAGE"]),
    "UMOIdentityRerank": (["images", "face_model", "identities", "criterion", "top_k"], ["IMAGE", "IMAGE", "STRING"]),
    "UMOIdentityReport": (["images", "face_model", "identities", "ground_truth"], ["STRING", "IMAGE"]),
    "UMOLoraLoader": (["model", "lora_name", "strength"], ["MODEL"]),
    "UMOReferenceConditioning": (["positive", "vae", "backbone", "long_side", "negative", "images",
                                  "image_1", "image_2", "image_3", "image_4"], ["CONDITIONING", "CONDITIONING"]),
    "UMOIdentityGuidance": (["model", "vae", "face_model", "identities", "strength", "start", "end", "reward",
                             "redetect_every"],
                            ["MODEL"]),
}


def _inputs(info: dict) -> list[str]:
    return list(info["input"].get("required", {})) + list(info["input"].get("optional", {}))


def test_every_node_is_registered_with_its_sockets(comfy):
    everything = comfy.get("/object_info")
    for node, (inputs, outputs) in PACK_NODES.items():
        assert node in everything, node
        info = everything[node]
        assert info["category"] == "UMO"
        assert _inputs(info) == inputs, node
        assert info["output"] == outputs, node
    assert "fixture_pack" in str(everything["UMOFaceModelLoader"]["input"]["required"]["face_pack"])
    failures = [line for line in comfy.log_text().splitlines()
                if ("IMPORT FAILED" in line or "Cannot import" in line) and "comfyui-umo" in line]
    assert not failures


def _identity_graph(reference_names: list[str], candidate_names: list[str]) -> dict:
    prompt = {"face": {"class_type": "UMOFaceModelLoader",
                       "inputs": {"face_pack": "fixture_pack", "provider": "CPU", "embedder": "onnx"}}}
    refs = {"face_model": ["face", 0]}
    for i, name in enumerate(reference_names, 1):
        prompt[f"ref{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        refs[f"image_{i}"] = [f"ref{i}", 0]
    prompt["identities"] = {"class_type": "UMOReferenceIdentities", "inputs": refs}
    previous = None
    for i, name in enumerate(candidate_names):
        prompt[f"cand{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        if previous is not None:
            prompt[f"batch{i}"] = {"class_type": "ImageBatch",
                                   "inputs": {"image1": previous, "image2": [f"cand{i}", 0]}}
            previous = [f"batch{i}", 0]
        else:
            previous = [f"cand{i}", 0]
    prompt["candidates"] = {"class_type": "ImageScale", "inputs": {"image": previous, "upscale_method": "nearest-exact",
                                                                   "width": 250, "height": 250, "crop": "disabled"}}
    return prompt


def _saved(comfy, history: dict, node: str) -> list[np.ndarray]:
    images = history["outputs"][node]["images"]
    return [np.asarray(Image.open(comfy.base / "output" / i["subfolder"] / i["filename"]).convert("RGB"), np.float32)
            for i in images]


def test_rerank_and_report_pick_the_right_people(comfy):
    prompt = _identity_graph(["Rob_Lowe_0001.jpg", "Nathalie_Baye_0002.jpg"],
                             ["Mary_Katherine_Smart_0001_5k.jpg", "Rob_Lowe_0002.jpg", "Teresa_Williams_0001_1k.jpg"])
    prompt["rerank"] = {"class_type": "UMOIdentityRerank", "inputs": {
        "images": ["candidates", 0], "face_model": ["face", 0], "identities": ["identities", 0],
        "criterion": "mimr", "top_k": 1}}
    prompt["save_best"] = {"class_type": "SaveImage", "inputs": {"images": ["rerank", 0], "filename_prefix": "best"}}
    prompt["save_annotated"] = {"class_type": "SaveImage", "inputs": {"images": ["rerank", 1],
                                                                      "filename_prefix": "annotated"}}
    prompt["report"] = {"class_type": "UMOIdentityReport", "inputs": {
        "images": ["candidates", 0], "face_model": ["face", 0], "identities": ["identities", 0]}}
    history = comfy.run(prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    best = _saved(comfy, history, "save_best")
    assert len(best) == 1
    rob = np.asarray(Image.open(PHOTOS / "Rob_Lowe_0002.jpg").convert("RGB"), np.float32)
    mary = np.asarray(Image.open(PHOTOS / "Mary_Katherine_Smart_0001_5k.jpg").convert("RGB"), np.float32)
    assert np.abs(best[0] - rob).mean() < 2 < np.abs(best[0] - mary).mean()
    annotated = _saved(comfy, history, "save_annotated")[0]
    assert np.abs(annotated - rob).mean() > 0.5  # boxes and labels were drawn
    title, header, *rows = "".join(history["outputs"]["report"]["text"]).splitlines()
    assert title == "in input order, ranked by complete"
    assert header.split()[:5] == ["rank", "image", "faces", "coverage", "duplicates"]
    assert "mimr" in header and "id_conf" in header and len(rows) >= 3
    assert all(line.startswith(DOUBTFUL_MARK) for line in rows[3:])  # after the images: what a '?' means
    assert rows[1].split()[:4] == ["1", "2", "1", "0.500"]  # Rob Lowe: ranked first, one of two people present
    assert re.search(r"R1->face 1 0\.\d\d, R2 missing$", rows[1]), rows[1]  # matched with his similarity


def test_reference_without_a_face_names_its_position(comfy):
    prompt = _identity_graph(["Rob_Lowe_0001.jpg", "no_face_view.jpg"], ["Rob_Lowe_0002.jpg"])
    prompt["report"] = {"class_type": "UMOIdentityReport", "inputs": {
        "images": ["candidates", 0], "face_model": ["face", 0], "identities": ["identities", 0]}}
    history = comfy.run(prompt)
    assert history["status"]["status_str"] == "error"
    messages = str(history["status"]["messages"])
    assert "reference 2: no face found" in messages


def _unet(weight_dtype: str = "default") -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux.safetensors", "weight_dtype": weight_dtype}}


def _flux_graph(lora: str | None, prefix: str, unet: dict | None = None) -> dict:
    """FLUX with two references through UMO Reference Conditioning, a 2-step KSampler, VAEDecode and rerank."""
    prompt = {
        "unet": unet or _unet(),
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_ae.safetensors"}},
        "text": {"class_type": "UMOTestTextEmbedding", "inputs": {"seed": 0}},
        "ref1": {"class_type": "LoadImage", "inputs": {"image": "Rob_Lowe_0001.jpg"}},
        "ref2": {"class_type": "LoadImage", "inputs": {"image": "Nathalie_Baye_0002.jpg"}},
        "refcond": {"class_type": "UMOReferenceConditioning", "inputs": {
            "positive": ["text", 0], "vae": ["vae", 0], "backbone": "auto", "long_side": REFERENCE_LONG_SIDE,
            "image_1": ["ref1", 0], "image_2": ["ref2", 0]}},
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["refcond", 0], "guidance": 4.0}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["guidance", 0], "negative": ["negative", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "face": {"class_type": "UMOFaceModelLoader",
                 "inputs": {"face_pack": "fixture_pack", "provider": "CPU", "embedder": "onnx"}},
        "identities": {"class_type": "UMOReferenceIdentities",
                       "inputs": {"face_model": ["face", 0], "image_1": ["ref1", 0], "image_2": ["ref2", 0]}},
        "rerank": {"class_type": "UMOIdentityRerank", "inputs": {
            "images": ["decode", 0], "face_model": ["face", 0], "identities": ["identities", 0],
            "criterion": "mimr", "top_k": 0}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["rerank", 0], "filename_prefix": prefix}},
    }
    if lora:
        prompt["lora"] = {"class_type": "UMOLoraLoader",
                          "inputs": {"model": ["unet", 0], "lora_name": lora, "strength": 1.0}}
        prompt["sampler"]["inputs"]["model"] = ["lora", 0]
    return prompt


def _with_identity_guidance(prompt: dict) -> dict:
    """UMO Identity Guidance between the sampler and the model it was given."""
    prompt["identity_guidance"] = {"class_type": "UMOIdentityGuidance", "inputs": {
        "model": prompt["sampler"]["inputs"]["model"], "vae": ["vae", 0], "face_model": ["face", 0],
        "identities": ["identities", 0], "strength": 0.5, "start": 0.0, "end": 1.0, "reward": "mimr"}}
    prompt["sampler"]["inputs"]["model"] = ["identity_guidance", 0]
    return prompt


def _sorted_pixels(comfy, history: dict) -> np.ndarray:
    """The saved batch's pixel values, sorted: the rerank may order the two images either way."""
    assert history["status"]["status_str"] == "success", history["status"]
    images = _saved(comfy, history, "save")
    assert len(images) == 2 and images[0].shape == (64, 64, 3)
    return np.sort(np.stack(images), axis=None)


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a - b).mean() > 0.5


def test_flux_graph_with_uno_lora_and_two_references(comfy):
    plain = _sorted_pixels(comfy, comfy.run(_flux_graph(None, "plain")))
    with_lora = _sorted_pixels(comfy, comfy.run(_flux_graph("tiny_uno.safetensors", "lora")))
    # The same seed and graph: only the LoRA differs, so the LoRA really changed the weights.
    assert _differ(plain, with_lora)


def test_identity_guidance_samples_and_leaves_the_model_unpatched(comfy):
    """The guidance node on the whole schedule; the random-weight VAE draws no face, so every step
    takes the no-face path and must leave the result identical. Afterwards the same (cached) UNET
    loader output sampled without guidance gives the plain result: the patch stayed on the clone."""
    guided = _sorted_pixels(comfy, comfy.run(_with_identity_guidance(_flux_graph(None, "guided"))))
    plain = _sorted_pixels(comfy, comfy.run(_flux_graph(None, "after_guidance")))
    assert np.array_equal(guided, plain)


def _flux2_graph(files: tuple[str, str], lora: str | None, prefix: str) -> dict:
    """The same graph on FLUX.2 [klein]: its transformer and VAE files, Qwen3-4B's text width, FLUX.2's latent, the
    references by FLUX.2's own rule (long_side 0), no guidance embedding."""
    transformer, vae = files
    prompt = _flux_graph(lora, prefix, {"class_type": "UNETLoader",
                                        "inputs": {"unet_name": transformer, "weight_dtype": "default"}})
    prompt["vae"]["inputs"]["vae_name"] = vae
    prompt["text"]["inputs"]["width"] = KLEIN_4B_TEXT_WIDTH
    prompt["refcond"]["inputs"]["long_side"] = 0
    del prompt["guidance"]
    prompt["sampler"]["inputs"]["positive"] = ["refcond", 0]
    prompt["latent"] = {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}
    return prompt


def _sampled_latents(comfy, prompt: dict, prefix: str):
    """Run `prompt` with a SaveLatent after its sampler; the sampled latents (the random test VAE's pixels would hide
    small differences)."""
    from safetensors.torch import load_file

    prompt["save_latent"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": ["sampler", 0], "filename_prefix": f"latents/{prefix}"}}
    _sorted_pixels(comfy, comfy.run(prompt))  # the graph completes, rerank included
    (path,) = (comfy.base / "output" / "latents").glob(f"{prefix}_*.latent")
    return load_file(path)["latent_tensor"]


def test_flux2_graph_with_lora_two_references_and_rerank(comfy, flux2_files):
    """A FLUX.2 file through ComfyUI's own detection (UNETLoader), UMO LoRA Loader with a peft FLUX.2 LoRA, UMO
    Reference Conditioning with two references (backbone auto), a 2-step KSampler, VAEDecode and the rerank; the
    same graph without the LoRA samples other latents."""
    plain = _sampled_latents(comfy, _flux2_graph(flux2_files, None, "flux2_plain"), "flux2_plain")
    with_lora = _sampled_latents(comfy, _flux2_graph(flux2_files, "tiny_flux2_peft.safetensors", "flux2_lora"),
                                 "flux2_lora")
    assert plain.shape == with_lora.shape == (2, 128, 4, 4)
    assert (plain - with_lora).abs().mean() > 1e-3


def test_flux2_identity_guidance_samples_and_leaves_the_model_unpatched(comfy, flux2_files):
    """Guidance through FLUX.2's VAE on the whole schedule (the random VAE draws no face: every step leaves the
    estimate as it is), then the same cached model sampled without guidance gives the same pixels."""
    guided = _sorted_pixels(comfy, comfy.run(_with_identity_guidance(_flux2_graph(flux2_files, None, "flux2_guided"))))
    plain = _sorted_pixels(comfy, comfy.run(_flux2_graph(flux2_files, None, "flux2_after_guidance")))
    assert np.array_equal(guided, plain)


def _quantized_graph_runs(comfy, unet: dict, name: str) -> None:
    """On a quantized FLUX: the LoRA changes the result, and identity guidance (no face: no change) runs with it."""
    plain = _sorted_pixels(comfy, comfy.run(_flux_graph(None, f"{name}_plain", unet)))
    lora = _sorted_pixels(comfy, comfy.run(_flux_graph("tiny_uno.safetensors", f"{name}_lora", unet)))
    guided = _sorted_pixels(comfy, comfy.run(_with_identity_guidance(
        _flux_graph("tiny_uno.safetensors", f"{name}_lora_guided", unet))))
    assert _differ(plain, lora)
    assert np.array_equal(lora, guided)


def test_fp8_flux_with_lora_references_guidance_and_rerank(comfy):
    """UNETLoader's weight_dtype fp8_e4m3fn, as many FLUX.1 users run it."""
    _quantized_graph_runs(comfy, _unet("fp8_e4m3fn"), "fp8")
    log = comfy.log_text()
    # 0.12.1's fork logs the model's dtype at debug level only; where ComfyUI logs it, it must be fp8.
    assert "model weight dtype torch.float8_e4m3fn" in log or "model weight dtype" not in log


def test_gguf_flux_with_lora_references_guidance_and_rerank(comfy, gguf_flux):
    """A Q8_0 GGUF file through ComfyUI-GGUF's loader, loaded beside the pack."""
    _quantized_graph_runs(comfy, {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": gguf_flux}}, "gguf")


def test_lora_for_the_wrong_family_is_an_error(comfy):
    history = comfy.run(_flux_graph("tiny_omnigen2.safetensors", "wrong"))
    assert history["status"]["status_str"] == "error"
    messages = str(history["status"]["messages"])
    assert "omnigen2 LoRA but the model is flux" in messages


async def _cancel_once_the_rerank_reports_progress(comfy, prompt: dict) -> tuple[str, float, dict]:
    """Queue `prompt` with a websocket open, press Cancel on the rerank node's first progress message (so the
    rerank is running, however slow the machine is), and return the prompt id, when Cancel was pressed and the
    `execution_interrupted` event's data (which node was interrupted; 0.12.1's fork keeps only the kinds of the
    events in /history). aiohttp: ComfyUI's own requirement, so the Python that runs ComfyUI has it."""
    import aiohttp

    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{comfy.url}/ws?clientId={client_id}") as ws:

            async def next_event(deadline: float) -> dict:
                while True:
                    message = await ws.receive(timeout=max(deadline - time.time(), 0.1))  # asyncio.TimeoutError
                    assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), message  # not closed
                    if message.type == aiohttp.WSMsgType.TEXT:  # binary ones are previews
                        return json.loads(message.data)

            async with session.post(f"{comfy.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as queued:
                prompt_id = (await queued.json())["prompt_id"]
            deadline = time.time() + 300  # loading the face model and 400 copies of the image come first
            while (event := await next_event(deadline))["type"] != "progress" or event["data"].get("node") != "rerank":
                pass
            async with session.post(f"{comfy.url}/interrupt", json={}):
                pressed = time.time()
            deadline = pressed + 60  # 400 images take minutes: a rerank that ignores Cancel times out here
            while (event := await next_event(deadline))["type"] != "execution_interrupted":
                pass
            return prompt_id, pressed, event["data"]


def test_cancel_stops_a_long_rerank(comfy):
    prompt = _identity_graph(["Rob_Lowe_0001.jpg"], ["t1_six_people.jpg"])
    prompt["many"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["cand0", 0], "amount": 400}}
    prompt["rerank"] = {"class_type": "UMOIdentityRerank", "inputs": {
        "images": ["many", 0], "face_model": ["face", 0], "identities": ["identities", 0],
        "criterion": "mimr", "top_k": 1}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["rerank", 0], "filename_prefix": "cancel"}}
    del prompt["candidates"]
    prompt_id, pressed, interrupted = asyncio.run(_cancel_once_the_rerank_reports_progress(comfy, prompt))
    assert interrupted["node_type"] == "UMOIdentityRerank", interrupted
    while prompt_id not in comfy.get(f"/history/{prompt_id}"):
        assert time.time() - pressed < 60, "the interrupted prompt never reached the history"
        time.sleep(0.2)
    assert comfy.get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "error"


@pytest.mark.parametrize("node", sorted(PACK_NODES))
def test_node_descriptions_and_display_names(comfy, node):
    info = comfy.get(f"/object_info/{node}")[node]
    assert info["display_name"].startswith("UMO ") and info["description"]
