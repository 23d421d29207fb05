"""A real ComfyUI (--cpu) with this pack loaded and a temporary models folder.

Runs only when COMFYUI_PATH points at a ComfyUI checkout (CI has none: skipped there).
The models folder holds the fixture face pack, a FLUX-architecture diffusion model with one
double and one single block and random weights (ComfyUI fixes FLUX's width, only the depth
is read from the file), the FLUX autoencoder architecture with random weights, and small LoRAs.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ASSETS, PHOTOS, ROOT, make_pack
from tests.flux2_layout import (
    flux2_file_shapes,
    flux2_transformer,
    flux2_vae,
    save_flux2_peft_lora,
    transformer_to_bfl,
)
from tests.flux_layout import ae_file_shapes, flux1_file_shapes, vae_to_bfl
from tests.official_packs import make_official_pack

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
HERE = Path(__file__).parent
LORA_RANK = 4
PACK_MODULE = "comfyui_umo_in_process"
PLACEHOLDER_MODELS = [("diffusion_models", "flux1-dev.safetensors"), ("diffusion_models", "omnigen2_fp16.safetensors"),
                      ("loras", "UMO_UNO.safetensors"), ("loras", "UMO_OmniGen2.safetensors"),
                      ("vae", "ae.safetensors"), ("text_encoders", "clip_l.safetensors"),
                      ("text_encoders", "t5xxl_fp16.safetensors"), ("text_encoders", "qwen_2.5_vl_fp16.safetensors"),
                      ("diffusion_models", "flux-2-klein-4b.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
                      ("vae", "flux2-vae.safetensors")]
EXAMPLE_INPUTS = {"reference_1.jpg": "Rob_Lowe_0001.jpg", "reference_2.jpg": "Nathalie_Baye_0002.jpg",
                  "candidate.png": "Rob_Lowe_0002.jpg"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Without COMFYUI_PATH every test of this folder is skipped, visibly (they only import ComfyUI when run)."""
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="set COMFYUI_PATH to a ComfyUI checkout to run the tests against a real ComfyUI")
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(skip)


def comfy_import_path() -> None:
    """Make ComfyUI's modules importable in the test process, on the CPU."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    try:  # a pip-installable ComfyUI (0.12.1's hiddenswitch fork) keeps `folder_paths`, `nodes`, ... in its package
        from comfy_compatibility.vanilla import prepare_vanilla_environment
    except ImportError:  # ComfyUI's own tree: they are top-level modules already
        return
    prepare_vanilla_environment()  # what its server does before it loads custom nodes


def comfy_extras_module(name: str):
    """One of ComfyUI's comfy_extras node modules: `comfy_extras.<name>` in ComfyUI's own tree,
    `comfy_extras.nodes.<name>` in 0.12.1's pip-installable fork."""
    comfy_import_path()
    try:
        return importlib.import_module(f"comfy_extras.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"comfy_extras.nodes.{name}")


def import_pack():
    """This pack imported in the test process the way ComfyUI imports a custom node folder (as a package)."""
    comfy_import_path()
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_MODULE]


def random_state_dict(shapes: dict[str, torch.Tensor], dtype=torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the given keys and shapes (norm scales 1, biases 0)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, value in shapes.items():
        if key.endswith(".scale") or (key.endswith(".weight") and value.ndim == 1):
            weights[key] = torch.ones(value.shape, dtype=dtype)
        elif key.endswith(".bias"):
            weights[key] = torch.zeros(value.shape, dtype=dtype)
        else:
            weights[key] = (torch.randn(value.shape, generator=generator) * 0.02).to(dtype)
    return weights


def detected_model(state_dict: dict[str, torch.Tensor]):
    """ComfyUI's MODEL for a diffusion model file, configured by ComfyUI's own model detection (as its loaders do)
    and built on the meta device: the tests that use it need the architecture, its LoRA key map and its shapes."""
    comfy_import_path()
    import comfy.model_detection
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet(state_dict, "")
    with torch.device("meta"):
        model = config.get_model(state_dict, "", device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def flux_config(**sizes) -> dict:
    """ComfyUI's configuration of FLUX.1-dev as its model detection gives it, with `sizes` on top (for models
    narrower than ComfyUI 0.3.64 detects: it fixes FLUX's width). Detection supplies every argument a ComfyUI
    version adds (0.8.0: txt_ids_dims)."""
    comfy_import_path()
    import comfy.model_detection

    return {**comfy.model_detection.detect_unet_config(flux1_file_shapes(), ""), **sizes}


def tiny_flux_model():
    """FLUX.1-dev with one double and one single block (ComfyUI reads the depth from the file, fixes the width)."""
    return detected_model(flux1_file_shapes())


def flux_vae():
    """ComfyUI's VAE loaded from a FLUX ae.safetensors state dict with random weights (float32)."""
    comfy_import_path()
    import comfy.sd

    return comfy.sd.VAE(sd=random_state_dict(ae_file_shapes(), dtype=torch.float32))


def uno_lora(double_blocks: int = 1, single_blocks: int = 1, hidden: int = 3072, seed: int = 1) -> dict:
    """A LoRA in UNO's processor layout for FLUX blocks of width `hidden`."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"qkv_lora1": (hidden, 3 * hidden), "proj_lora1": (hidden, hidden),
              "qkv_lora2": (hidden, 3 * hidden), "proj_lora2": (hidden, hidden)}
    single = {"qkv_lora": (hidden, 3 * hidden), "proj_lora": (5 * hidden, hidden)}
    lora = {}
    for prefix, modules, count in (("double_blocks", shapes, double_blocks), ("single_blocks", single, single_blocks)):
        for i in range(count):
            for name, (inputs, outputs) in modules.items():
                key = f"{prefix}.{i}.processor.{name}"
                lora[f"{key}.down.weight"] = torch.randn(LORA_RANK, inputs, generator=generator) * 0.1
                lora[f"{key}.up.weight"] = torch.randn(outputs, LORA_RANK, generator=generator) * 0.1
    return lora


def omnigen2_peft_lora(layers: int = 2, hidden: int = 2520, kv: int = 840, seed: int = 2) -> dict:
    """A LoRA in UMO_OmniGen2's peft layout (to_q, to_k, to_v, to_out.0 of the attention layers)."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for i in range(layers):
        for module, outputs in (("to_q", hidden), ("to_k", kv), ("to_v", kv), ("to_out.0", hidden)):
            key = f"layers.{i}.attn.{module}"
            lora[f"{key}.lora_A.default.weight"] = torch.randn(LORA_RANK, hidden, generator=generator) * 0.1
            lora[f"{key}.lora_B.default.weight"] = torch.randn(outputs, LORA_RANK, generator=generator) * 0.1
    return lora


# Test scaffolding, not part of the pack: FLUX needs T5-XXL + CLIP-L text embeddings and the 4.7B
# T5 cannot run here, so this node stands in for the text encoder with fixed random embeddings
# of FLUX's real shapes ([1, tokens, 4096] and pooled [1, 768]); `width` 7680 gives FLUX.2 [klein] 4B's
# (Qwen3-4B's stacked layers).
TEXT_EMBEDDING_NODE = """
import torch


class UMOTestTextEmbedding:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})},
                "optional": {"width": ("INT", {"default": 4096, "max": 16384})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, width=4096):
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randn(1, 8, width, generator=generator)
        return ([[tokens, {"pooled_output": torch.randn(1, 768, generator=generator)}]],)


NODE_CLASS_MAPPINGS = {"UMOTestTextEmbedding": UMOTestTextEmbedding}
"""


def write_gguf(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """A FLUX GGUF file as ComfyUI-GGUF's convert tool and llama.cpp's quantizer write one, with mixed types:
    the double blocks' attention weights Q8_0 (quantizing all of FLUX in numpy takes minutes here), the other
    matrices F16, vectors F32."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, tensor in state_dict.items():
        data = tensor.float().numpy()
        if data.ndim == 1:
            kind = gguf.GGMLQuantizationType.F32
        elif key.startswith("double_blocks.") and "_attn." in key:
            kind = gguf.GGMLQuantizationType.Q8_0
        else:
            kind = gguf.GGMLQuantizationType.F16
        writer.add_tensor(key, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as error:
            return {"http_error": error.code, **json.loads(error.read() or b"{}")}

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for its history entry."""
        queued = self.post("/prompt", {"prompt": prompt})
        assert "prompt_id" in queued and not queued.get("node_errors"), queued
        prompt_id = queued["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log: {self.log}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, assets) -> ComfyServer:
    """`assets`: without the face assets this skips, saying where they were looked for (fails under CI=true)."""
    base = tmp_path_factory.mktemp("comfy")
    models = base / "models"
    make_pack(models / "insightface" / "models" / "fixture_pack")
    for folder in ("diffusion_models", "vae", "loras", "checkpoints", "text_encoders"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    save_file(random_state_dict(flux1_file_shapes()), models / "diffusion_models" / "tiny_flux.safetensors")
    save_file(random_state_dict(ae_file_shapes()), models / "vae" / "tiny_ae.safetensors")
    save_file(uno_lora(), models / "loras" / "tiny_uno.safetensors")
    save_file(omnigen2_peft_lora(), models / "loras" / "tiny_omnigen2.safetensors")
    # The example workflows' official file names, as empty placeholders: enough for /prompt's validation.
    for folder, name in PLACEHOLDER_MODELS:
        (models / folder / name).touch()
    make_official_pack(models / "insightface" / "models", "antelopev2")  # the example workflows' pack
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "comfyui-umo").symlink_to(ROOT, target_is_directory=True)
    (custom_nodes / "umo_test_text_embedding.py").write_text(TEXT_EMBEDDING_NODE)
    for folder in ("input", "output", "temp", "user"):
        (base / folder).mkdir()
    for photo in (ASSETS / "images" / "photos").glob("*.jpg"):
        shutil.copyfile(photo, base / "input" / photo.name)
    for name, photo in EXAMPLE_INPUTS.items():
        shutil.copyfile(PHOTOS / photo, base / "input" / name)
    config = base / "extra_model_paths.yaml"
    config.write_text(
        "umo_test:\n"
        f"  base_path: {base}\n"
        "  diffusion_models: models/diffusion_models\n  vae: models/vae\n  loras: models/loras\n"
        "  checkpoints: models/checkpoints\n  text_encoders: models/text_encoders\n"
        "  insightface: models/insightface\n  custom_nodes: custom_nodes\n"
    )
    port = _free_port()
    log = base / "comfyui.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--extra-model-paths-config", str(config), "--input-directory", str(base / "input"),
               "--output-directory", str(base / "output"), "--temp-directory", str(base / "temp"),
               "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
    with log.open("w") as log_file:
        process = subprocess.Popen(command, cwd=COMFYUI_PATH, stdout=log_file, stderr=subprocess.STDOUT)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log)
    try:
        deadline = time.time() + 600  # minutes on a loaded 2-core machine (imports, node registration)
        while True:
            try:
                server.get("/object_info/UMOFaceModelLoader")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start:\n{server.log_text()[-4000:]}") from None
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def gguf_flux(comfy) -> str:
    """The tiny FLUX as a GGUF file in the diffusion_models folder, for city96's ComfyUI-GGUF (a custom node pack
    installed in $COMFYUI_PATH/custom_nodes, as its users install it)."""
    if "UnetLoaderGGUF" not in comfy.get("/object_info"):
        if (Path(COMFYUI_PATH) / "custom_nodes" / "ComfyUI-GGUF").is_dir():
            # Installed, yet this ComfyUI cannot import it: nothing to install, so a skip in CI too.
            pytest.skip("ComfyUI-GGUF is in custom_nodes but this ComfyUI does not load it (0.12.1's pip-installable "
                        "fork: its folder_names_and_paths has no get() with a default); see the server log")
        message = (f"ComfyUI-GGUF is not loaded: clone https://github.com/city96/ComfyUI-GGUF into "
                   f"{COMFYUI_PATH}/custom_nodes and pip install gguf")
        if os.environ.get("CI", "").lower() == "true":  # as for the face assets: in CI a missing part fails
            pytest.fail(message)
        pytest.skip(message)
    models = comfy.base / "models" / "diffusion_models"
    write_gguf(load_file(models / "tiny_flux.safetensors"), models / "tiny_flux-Q8_0.gguf")
    return "tiny_flux-Q8_0.gguf"


FLUX2_NEEDED = "the FLUX.2 tests need ComfyUI 0.12.1 or later"


def flux2_unsupported_reason() -> str | None:
    """Why ComfyUI at COMFYUI_PATH cannot load a small FLUX.2 file as the file says, or None when it can.

    0.3.64 has no FLUX.2 code; 0.8.0's model detection builds every FLUX.2 file with 48 heads, so only the full-size
    [dev] loads correctly there; 0.12.1 reads the head count from the file (its width over the rotary axes).
    """
    comfy_import_path()
    import comfy.model_detection

    config = comfy.model_detection.detect_unet_config(flux2_file_shapes(heads=2), "")
    if config is None or config.get("image_model") != "flux2":
        return f"this ComfyUI has no FLUX.2 model code; {FLUX2_NEEDED}"
    if config["num_heads"] != 2:
        return (f"this ComfyUI's model detection builds every FLUX.2 file with {config['num_heads']} heads (a 2-head "
                f"test model and FLUX.2 [klein] load wrongly); {FLUX2_NEEDED}")
    return None


@pytest.fixture(scope="session")
def flux2_support() -> None:
    """Skips, with the reason, on a ComfyUI that cannot load FLUX.2 [klein]-sized files."""
    reason = flux2_unsupported_reason()
    if reason:
        pytest.skip(reason)


def flux2_vae_state_dict() -> dict[str, torch.Tensor]:
    """tests.flux2_layout.flux2_vae() in the layout of FLUX.2's ae.safetensors."""
    return vae_to_bfl(flux2_vae().state_dict())


def tiny_flux2_state_dict() -> dict[str, torch.Tensor]:
    """A 2-head FLUX.2 [klein]-style transformer (Qwen3-4B's text width, random weights) as its file holds it."""
    return {key: tensor.to(torch.bfloat16).contiguous()
            for key, tensor in transformer_to_bfl(flux2_transformer().state_dict()).items()}


def tiny_flux2_vae_state_dict() -> dict[str, torch.Tensor]:
    """FLUX.2's autoencoder as its file holds it, with small random weights (as the FLUX.1 autoencoder's file):
    diffusers' own initialisation decodes to saturated pixels, where a change would not show."""
    vae = random_state_dict(flux2_vae_state_dict(), dtype=torch.float32)
    vae["bn.running_var"], vae["bn.num_batches_tracked"] = torch.ones_like(vae["bn.running_var"]), torch.tensor(0)
    return vae


@pytest.fixture(scope="session")
def flux2_files(comfy, flux2_support) -> tuple[str, str]:
    """tiny_flux2_state_dict() and tiny_flux2_vae_state_dict() in the server's diffusion_models and vae folders:
    (transformer file, VAE file); and a peft LoRA of the transformer, tiny_flux2_peft.safetensors, in its loras
    folder."""
    models = comfy.base / "models"
    save_file(tiny_flux2_state_dict(), models / "diffusion_models" / "tiny_flux2.safetensors")
    save_file(tiny_flux2_vae_state_dict(), models / "vae" / "tiny_flux2_ae.safetensors")
    save_flux2_peft_lora(models / "loras" / "tiny_flux2_peft.safetensors")
    return "tiny_flux2.safetensors", "tiny_flux2_ae.safetensors"
