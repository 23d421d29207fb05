"""UMO Identity Face Fix with ComfyUI's own classes: a tiny FLUX (one double and one single block, random weights)
loaded by ComfyUI's loader, ComfyUI's VAE and sampler, the real face model and real photos; and a tiny FLUX.2
[klein]-style model with FLUX.2's autoencoder where ComfyUI builds it as its file says (0.12.1; skipped, with the
reason, elsewhere).

The conditioning is instrumented where the model reads it (a model function wrapper records the reference latents
of every model call) and where the VAE encodes (the crops): each face's crop is recognised by the face model, and the
reference its sampling saw must be that person's. A graph run through ComfyUI's server and Cancel over its
websocket follow. Random weights draw no face, so the fixed faces are not better: the report says so ("not found
after the fix"); the identity gain of a real UMO model is not (and cannot be) shown here.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.comfyui.conftest import (
    flux_vae,
    import_pack,
    random_state_dict,
    tiny_flux2_state_dict,
    tiny_flux2_vae_state_dict,
)
from tests.flux2_layout import KLEIN_4B_TEXT_WIDTH
from tests.flux_layout import flux1_file_shapes
from tests.group_photos import group_photo, lfw_face
from umo_core import UMOError
from umo_core.backbones import get
from umo_core.backbones.flux1.references import resize_reference
from umo_core.faces.face_model import Identities
from umo_core.images import float_image

ANGELA, ANDERS, AKHMED = "Angela_Bassett", "Anders_Fogh_Rasmussen", "Akhmed_Zakayev"
STEPS, GUIDE, LONG_SIDE = 2, 128, 64  # small crops and references keep the full-width FLUX block fast on a CPU


def reference_photos() -> list[np.ndarray]:
    """R1 Angela (square photo), R2 Anders (a wide photo): their reference latents differ in shape as well."""
    angela = np.asarray(group_photo([lfw_face(f"{ANGELA}_2")]))
    anders = np.asarray(group_photo([lfw_face(f"{ANDERS}_2")]))
    return [angela, np.pad(anders, ((0, 0), (96, 96), (0, 0)), constant_values=128)]


def photo(*people: str) -> torch.Tensor:
    return float_image(group_photo([lfw_face(person) for person in people]))


@pytest.fixture(scope="module")
def flux():
    """ComfyUI's FLUX from a state dict with FLUX.1-dev's keys (ComfyUI's own loader and model detection)."""
    import_pack()
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(random_state_dict(flux1_file_shapes()))


@pytest.fixture(scope="module")
def vae():
    return flux_vae()


@pytest.fixture(scope="module")
def people(face_model) -> Identities:
    return face_model.identities(reference_photos())


def _conditioning() -> tuple[list, list]:
    generator = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 8, 4096, generator=generator),
                 {"pooled_output": torch.randn(1, 768, generator=generator), "guidance": 4.0}]]
    return positive, [[torch.zeros(1, 8, 4096), {"pooled_output": torch.zeros(1, 768)}]]


def _klein_conditioning() -> tuple[list, list]:
    """FLUX.2 [klein] 4B's text embedding (Qwen3-4B's three layers stacked) as CLIPTextEncode gives it: no pooled
    output (ComfyUI sets the key), no guidance (klein is distilled)."""
    positive = [[torch.randn(1, 8, KLEIN_4B_TEXT_WIDTH, generator=torch.Generator().manual_seed(0)),
                 {"pooled_output": None}]]
    return positive, [[torch.zeros(1, 8, KLEIN_4B_TEXT_WIDTH), {"pooled_output": None}]]


class Recorder:
    """The model with a function wrapper recording each call's reference latents and reference method, and the
    VAE's encodes."""

    def __init__(self, flux, vae, monkeypatch, on_call=None):
        self.references: list[list[torch.Tensor]] = []
        self.methods: list[str | None] = []
        self.encoded: list[torch.Tensor] = []
        self.model = flux.clone()
        encode = vae.encode

        def wrapper(apply_model, args):
            self.references.append([latent.clone() for latent in args["c"].get("ref_latents", [])])
            self.methods.append(args["c"].get("ref_latents_method"))
            if on_call is not None:
                on_call(len(self.references))
            return apply_model(args["input"], args["timestep"], **args["c"])

        def recorded_encode(pixels):
            self.encoded.append(pixels.clone())
            return encode(pixels)

        self.model.set_model_unet_function_wrapper(wrapper)
        monkeypatch.setattr(vae, "encode", recorded_encode)


def _face_fix(recorder: Recorder, vae, face_model, people, images, only_below=0.0, guidance_strength=0.0,
              long_side=LONG_SIDE, conditioning=_conditioning):
    positive, negative = conditioning()
    node = import_pack().nodes.face_fix.IdentityFaceFix
    return node.execute(images, recorder.model, vae, positive, negative, face_model, people, 7, STEPS, 1.0, "euler",
                        "simple", 0.4, GUIDE, 0.5, 8, only_below, long_side, guidance_strength)


def _person(face_model, people, crop: torch.Tensor) -> int:
    """Who the crop shows: the reference whose cosine with its largest face is highest."""
    analysed = face_model.analyse([crop])[0]
    largest = int(np.argmax(analysed.faces.areas()))
    return int(torch.argmax(people.embeddings @ analysed.embeddings[largest]))


def _expected_reference(flux, vae, reference: np.ndarray) -> torch.Tensor:
    """The reference latent as the model should read it: UNO's resize, VAE encode, FLUX's latent scaling."""
    return flux.model.process_latent_in(vae.encode(resize_reference(reference, LONG_SIDE)[None]))


def test_each_face_is_sampled_with_its_own_persons_reference(flux, vae, face_model, people, monkeypatch):
    """A batch of two: Angela left and Anders right, then swapped. Each crop the VAE encodes is recognised; every
    model call while sampling it reads one reference latent, that person's. Pixels outside the masks are unchanged."""
    expected = [_expected_reference(flux, vae, photo_) for photo_ in reference_photos()]
    recorder = Recorder(flux, vae, monkeypatch)
    images = torch.stack([photo(f"{ANGELA}_1", f"{ANDERS}_1"), photo(f"{ANDERS}_1", f"{ANGELA}_1")])
    fixed, masks, report = _face_fix(recorder, vae, face_model, people, images)[:3]
    crops = recorder.encoded[1::2]  # per face: its reference is encoded, then its crop
    assert len(crops) == 4 and len(recorder.references) == 4 * STEPS
    shown = [_person(face_model, people, crop[0]) for crop in crops]
    assert sorted(shown[:2]) == sorted(shown[2:]) == [0, 1]
    for face, person in enumerate(shown):
        for call in recorder.references[face * STEPS:(face + 1) * STEPS]:
            assert len(call) == 1  # that person's reference only
            assert call[0].shape == expected[person].shape
            assert torch.allclose(call[0].float(), expected[person].float(), atol=1e-3)
    untouched = masks == 0
    assert untouched.any() and (~untouched).any()
    assert torch.equal(fixed[untouched], images[untouched])
    assert not torch.equal(fixed[~untouched], images[~untouched])
    rows = report.splitlines()[1:5]
    assert [row.split()[0] for row in rows] == ["1", "1", "2", "2"]
    assert all(row.split()[2] in ("R1", "R2") for row in rows)


def test_only_below_skips_the_right_person(flux, vae, face_model, people, monkeypatch):
    """Angela is right, Akhmed stands where Anders should: with only_below the one face sampled is Akhmed's, with
    R2's reference; Angela's face and everything around it come back bit for bit."""
    expected = _expected_reference(flux, vae, reference_photos()[1])
    recorder = Recorder(flux, vae, monkeypatch)
    image = photo(f"{ANGELA}_1", f"{AKHMED}_1")
    fixed, masks, report = _face_fix(recorder, vae, face_model, people, image[None], only_below=0.45)[:3]
    assert len(recorder.references) == STEPS
    assert all(call[0].shape == expected.shape for call in recorder.references)
    x1, y1, x2, y2 = min(face_model.detect(image)[0].boxes.astype(int).tolist())  # the left face: Angela's
    assert masks[0, y1:y2, x1:x2].max() == 0
    assert torch.equal(fixed[0][masks[0] == 0], image[masks[0] == 0])
    assert "kept (at or above only_below 0.45)" in report


def test_an_image_with_nothing_to_fix_passes_through(flux, vae, face_model, people, monkeypatch):
    recorder = Recorder(flux, vae, monkeypatch)
    image = photo(f"{ANGELA}_1", f"{ANDERS}_1")
    fixed, masks = _face_fix(recorder, vae, face_model, people, image[None], only_below=0.3)[:2]
    assert torch.equal(fixed[0], image) and not masks.any() and not recorder.references


def test_cancel_during_the_second_face_stops_the_run(flux, vae, face_model, people, monkeypatch):
    """Cancel pressed at the second face's first model call: the run stops there, the third face is never sampled."""
    import comfy.model_management

    def press_cancel(calls: int) -> None:
        if calls == STEPS + 1:
            comfy.model_management.interrupt_current_processing(True)

    recorder = Recorder(flux, vae, monkeypatch, on_call=press_cancel)
    images = torch.stack([photo(f"{ANGELA}_1", f"{ANDERS}_1"), photo(f"{ANDERS}_1", f"{ANGELA}_1")])
    try:
        with pytest.raises(Exception) as raised:  # the class lives in comfy.interruption in some ComfyUI versions
            _face_fix(recorder, vae, face_model, people, images)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert type(raised.value).__name__ == "InterruptProcessingException"
    assert len(recorder.references) == STEPS + 1


def test_identity_guidance_steers_toward_the_one_reference(flux, vae, torch_face_model, people, monkeypatch):
    """guidance_strength > 0: the sampling model is UMO Identity Guidance's clone with that face's person alone."""
    guidance = import_pack().nodes.face_fix.IdentityGuidance
    guided: list[Identities] = []
    execute = guidance.execute

    def recorded(model, vae_, face_model_, identities, *args):
        guided.append(identities)
        return execute(model, vae_, face_model_, identities, *args)

    monkeypatch.setattr(guidance, "execute", recorded)
    recorder = Recorder(flux, vae, monkeypatch)
    _face_fix(recorder, vae, torch_face_model, people, photo(f"{ANGELA}_1", f"{AKHMED}_1")[None], only_below=0.45,
              guidance_strength=0.05)
    assert len(guided) == 1 and len(guided[0]) == 1
    assert torch.equal(guided[0].embeddings[0], people.embeddings[1])  # R2, whom Akhmed's face was matched to


@pytest.mark.parametrize(("case", "message"), [
    ("SDXL", "UMO Identity Face Fix: the model is SDXL, which the face fix cannot condition on a reference photo"),
    ("Flux2", "UMO Identity Face Fix: the VAE makes 16-channel latents, but FLUX.2 needs FLUX.2's autoencoder "
              r"\(flux2-vae.safetensors\)"),  # FLUX.1's VAE with a FLUX.2 model
    ("no photos", "the identities carry no reference photos"),
    ("no face", r"no face was found in the 1 image\(s\)"),
])
def test_bad_input_is_one_clear_error_before_sampling(flux, vae, face_model, people, monkeypatch, photos, case,
                                                      message):
    import comfy.model_base

    recorder = Recorder(flux, vae, monkeypatch)
    images = photo(f"{ANGELA}_1")[None]
    if case in ("SDXL", "Flux2"):
        if not hasattr(comfy.model_base, case):
            pytest.skip(f"this ComfyUI has no {case}")
        recorder.model = SimpleNamespace(model=object.__new__(getattr(comfy.model_base, case)))
    elif case == "no photos":
        people = Identities(people.embeddings, people.faces, None)
    else:
        images = float_image(np.asarray(Image.open(photos / "no_face_view.jpg").convert("RGB")))[None]
    with pytest.raises(UMOError, match=message):
        _face_fix(recorder, vae, face_model, people, images)
    assert not recorder.references and not recorder.encoded


# FLUX.2 [klein]: ComfyUI's own FLUX.2 built from a 2-head file by its model detection, FLUX.2's autoencoder.

@pytest.fixture(scope="module")
def flux2(flux2_support):
    import_pack()
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(tiny_flux2_state_dict())


@pytest.fixture(scope="module")
def flux2_ae(flux2_support):
    import_pack()
    import comfy.sd

    return comfy.sd.VAE(sd=tiny_flux2_vae_state_dict())


def test_flux2_each_face_is_sampled_with_its_own_persons_reference(flux2, flux2_ae, face_model, people, monkeypatch):
    """Anders left and Angela right (the references' order swapped). Each crop the VAE encodes is recognised; every
    model call while sampling it reads one reference latent, that person's, encoded by FLUX.2's rule (the photo at
    its own size, sides cut to multiples of 16) and placed by ComfyUI's `index` method. Pixels outside the masks
    are unchanged."""
    expected = [flux2.model.process_latent_in(flux2_ae.encode(get("flux2").resize_reference(float_image(p), 1)[None]))
                for p in reference_photos()]
    assert expected[0].shape != expected[1].shape  # a mix-up would show in the shape as well
    recorder = Recorder(flux2, flux2_ae, monkeypatch)
    image = photo(f"{ANDERS}_1", f"{ANGELA}_1")
    fixed, masks, report = _face_fix(recorder, flux2_ae, face_model, people, image[None], long_side=0,
                                     conditioning=_klein_conditioning)[:3]
    crops = recorder.encoded[1::2]  # per face: its reference is encoded, then its crop
    assert len(crops) == 2 and len(recorder.references) == 2 * STEPS
    shown = [_person(face_model, people, crop[0]) for crop in crops]
    assert sorted(shown) == [0, 1]
    assert set(recorder.methods) == {"index"}
    for face, person in enumerate(shown):
        for call in recorder.references[face * STEPS:(face + 1) * STEPS]:
            assert len(call) == 1  # that person's reference only
            assert call[0].shape == expected[person].shape
            assert torch.allclose(call[0].float(), expected[person].float(), atol=1e-3)
    untouched = masks[0] == 0
    assert untouched.any() and (~untouched).any()
    assert torch.equal(fixed[0][untouched], image[untouched])
    assert not torch.equal(fixed[0][~untouched], image[~untouched])
    rows = report.splitlines()[1:3]
    assert sorted(row.split()[2] for row in rows) == ["R1", "R2"]


def test_flux2_bad_input_is_one_clear_error_before_sampling(flux, flux2, flux2_ae, face_model, people, monkeypatch):
    """A long_side on FLUX.2 (its references follow FLUX.2's own rule) and FLUX.2's VAE with FLUX.1: one error each,
    before any face is encoded or sampled."""
    image = photo(f"{ANGELA}_1")[None]
    recorder = Recorder(flux2, flux2_ae, monkeypatch)
    with pytest.raises(UMOError, match=r"UMO Identity Face Fix: long_side \(64\) sets UNO's rule for FLUX.1; "
                                       "FLUX.2 references follow FLUX.2's own rule"):
        _face_fix(recorder, flux2_ae, face_model, people, image, conditioning=_klein_conditioning)
    assert not recorder.references and not recorder.encoded
    recorder = Recorder(flux, flux2_ae, monkeypatch)
    with pytest.raises(UMOError, match=r"UMO Identity Face Fix: the VAE makes 128-channel latents, but FLUX.1 "
                                       r"\(UNO\) needs FLUX.1's autoencoder \(ae.safetensors\)"):
        _face_fix(recorder, flux2_ae, face_model, people, image)
    assert not recorder.references and not recorder.encoded


# Through ComfyUI's server: the node in a graph, its outputs saved, and Cancel over the websocket.

def _write_inputs(comfy) -> None:
    for name, image in (("facefix_r1.png", reference_photos()[0]), ("facefix_r2.png", reference_photos()[1]),
                        ("facefix_a.png", group_photo([lfw_face(f"{ANGELA}_1"), lfw_face(f"{ANDERS}_1")])),
                        ("facefix_b.png", group_photo([lfw_face(f"{ANDERS}_1"), lfw_face(f"{ANGELA}_1")]))):
        Image.fromarray(np.asarray(image)).save(comfy.base / "input" / name)


def _face_fix_graph(steps: int) -> dict:
    load = {name: {"class_type": "LoadImage", "inputs": {"image": f"facefix_{name}.png"}}
            for name in ("r1", "r2", "a", "b")}
    return {
        **load,
        "unet": {"class_type": "UNETLoader",
                 "inputs": {"unet_name": "tiny_flux.safetensors", "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "tiny_ae.safetensors"}},
        "text": {"class_type": "UMOTestTextEmbedding", "inputs": {"seed": 0}},
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": 4.0}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
        "face": {"class_type": "UMOFaceModelLoader",
                 "inputs": {"face_pack": "fixture_pack", "provider": "CPU", "embedder": "onnx"}},
        "identities": {"class_type": "UMOReferenceIdentities",
                       "inputs": {"face_model": ["face", 0], "image_1": ["r1", 0], "image_2": ["r2", 0]}},
        "facefix": {"class_type": "UMOIdentityFaceFix", "inputs": {
            "images": ["batch", 0], "model": ["unet", 0], "vae": ["vae", 0], "positive": ["guidance", 0],
            "negative": ["negative", 0], "face_model": ["face", 0], "identities": ["identities", 0], "seed": 7,
            "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 0.4,
            "guide_size": GUIDE, "context": 0.5, "feather": 8, "only_below": 0.0, "long_side": LONG_SIDE}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["facefix", 0], "filename_prefix": "facefix"}},
        "mask": {"class_type": "MaskToImage", "inputs": {"mask": ["facefix", 1]}},
        "save_mask": {"class_type": "SaveImage", "inputs": {"images": ["mask", 0], "filename_prefix": "facefix_mask"}},
    }


def _saved(comfy, history: dict, node: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(comfy.base / "output" / i["subfolder"] / i["filename"]).convert("RGB"))
            for i in history["outputs"][node]["images"]]


def test_face_fix_graph_in_comfyui(comfy):
    """The node in a graph: two images with the two people in swapped places; the saved results equal the inputs
    wherever the saved mask is 0, and differ inside it; the report (shown on the node) has a row per face."""
    _write_inputs(comfy)
    history = comfy.run(_face_fix_graph(STEPS))
    assert history["status"]["status_str"] == "success", history["status"]
    fixed, masks = _saved(comfy, history, "save"), _saved(comfy, history, "save_mask")
    for name, result, mask in zip(("a", "b"), fixed, masks):
        original = np.asarray(Image.open(comfy.base / "input" / f"facefix_{name}.png").convert("RGB"))
        outside = mask[..., 0] == 0
        assert outside.any() and (~outside).any()
        assert np.array_equal(result[outside], original[outside])
        assert not np.array_equal(result[~outside], original[~outside])
    rows = "".join(history["outputs"]["facefix"]["text"]).splitlines()
    assert rows[0].split() == ["image", "face", "toward", "before", "after", "result"]
    assert sorted(row.split()[0] + row.split()[2] for row in rows[1:5]) == ["1R1", "1R2", "2R1", "2R2"]


async def _cancel_in_the_second_face(comfy, prompt: dict) -> tuple[dict, int]:
    """Queue `prompt`, press Cancel once the face fix reports progress past the first face's steps, and return
    the websocket's execution_interrupted event (its history entry does not name the node in every ComfyUI) and
    the highest progress value reported."""
    import aiohttp

    client_id = uuid.uuid4().hex
    steps = prompt["facefix"]["inputs"]["steps"]
    highest, pressed = 0, False
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{comfy.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{comfy.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as queued:
                prompt_id = (await queued.json())["prompt_id"]
            deadline = time.time() + 600
            while True:
                message = await ws.receive(timeout=max(deadline - time.time(), 0.1))
                assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), message
                if message.type == aiohttp.WSMsgType.BINARY:
                    continue
                event = json.loads(message.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                assert event["type"] not in ("execution_success", "execution_error"), event
                if event["type"] == "execution_interrupted":
                    return data, highest
                if event["type"] == "progress" and data.get("node") == "facefix":
                    assert data["max"] == 4 * steps  # one bar over every face's steps
                    highest = max(highest, data["value"])
                    if data["value"] > steps and not pressed:
                        async with session.post(f"{comfy.url}/interrupt", json={}):
                            pressed = True


def test_cancel_in_the_second_face_stops_the_face_fix(comfy):
    _write_inputs(comfy)
    steps = 6
    prompt = _face_fix_graph(steps)
    prompt["facefix"]["inputs"]["seed"] = 8  # not the cached result of the graph test
    interrupted, highest = asyncio.run(_cancel_in_the_second_face(comfy, prompt))
    assert interrupted["node_type"] == "UMOIdentityFaceFix", interrupted
    assert steps < highest < 4 * steps  # stopped after the first face, before the last
