"""A real ComfyUI, in this Python process, for the integration tests (no mocks, no server).

ComfyUI is found through the env var COMFYUI_PATH, else ~/ComfyUI. It runs with --cpu; every folder it
reads or writes (models, input, output, temp, user) is a temp dir, so nothing touches the checkout.
The pack is loaded the way ComfyUI loads custom nodes: `nodes.load_custom_node(<repo root>)`.
Prompts go through ComfyUI's own validation and `execution.PromptExecutor`.

Tiny models are built at run time with explicit random init (ComfyUI's ops skip init):
* SD1.5 checkpoint for CheckpointLoaderSimple: a one-level UNet (model_channels 320, context 768),
  a TAESD VAE and a full-size CLIP-L (the checkpoint loader always builds the 12-layer CLIP-L);
* SD1.5 UNet alone, SD3 MMDiT of depth 2, for UNETLoader;
* Flux built directly (bypassing detection, which fixes hidden=3072) for fused-qkv offset patches.

See conftest.py for the fixture API.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import sys
import uuid
from typing import Any

import torch

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TESTS_DIR = os.path.join(REPO_ROOT, "tests")
if TESTS_DIR not in [os.path.abspath(p or ".") for p in sys.path]:
    sys.path.append(TESTS_DIR)  # tests/reference.py, also when only tests/integration is run

from reference import orth64, project64, union64, ulp  # noqa: E402,F401  (re-exported: `from harness import project64`)

import input_nodes  # noqa: E402  (test-only input nodes, registered in ComfyHarness._start)

GEN = torch.Generator().manual_seed(0)
LRU_SIZE = 1024


def find_comfyui() -> tuple[str | None, str]:
    """(path, reason): the ComfyUI checkout to use, or None and why not."""
    env = os.environ.get("COMFYUI_PATH")
    path = os.path.abspath(os.path.expanduser(env or "~/ComfyUI"))
    where = f"COMFYUI_PATH={env}" if env else "~/ComfyUI (set COMFYUI_PATH to use another checkout)"
    if not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")) or not os.path.isfile(os.path.join(path, "execution.py")):
        return None, f"no ComfyUI checkout at {where}"
    return path, ""


def check_importable(path: str) -> str:
    """'' if ComfyUI's core imports in this Python, else the reason (for example torchvision missing).

    sys.path is restored afterwards (the harness puts ComfyUI first only when a test uses it), and after a
    failure the half-imported modules are dropped, so other test directories in the session are unaffected.
    """
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    sys.path.insert(0, path)
    try:
        from comfy.cli_args import args
        args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
        import folder_paths  # noqa: F401
    except Exception as e:  # ImportError, but also e.g. RuntimeError from a broken torch install
        for name in set(sys.modules) - saved_modules:
            del sys.modules[name]
        return f"ComfyUI at {path} cannot be imported in {sys.executable}: {type(e).__name__}: {e}"
    finally:
        sys.path[:] = saved_path
    return ""


def _cache_args(lru: int) -> dict:
    """PromptExecutor's cache_args as ComfyUI's main.py passes them: every key any ComfyUI reads (0.8 reads `lru`
    and `ram`; later ones also `ram_inactive`), RAM-pressure eviction off ("ram": 0 GB of headroom)."""
    return {"lru": lru, "ram": 0, "ram_inactive": 0}


class _StubServer:
    """The attributes execution.py and comfy_execution/progress.py use on PromptServer.instance."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def __init__(self):
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class ComfyHarness:
    """See conftest.py for the public API."""

    def __init__(self, comfy_root: str, base: str):
        self.comfy_root = comfy_root
        self.base = base
        self.dirs = {name: os.path.join(base, *name.split("/")) for name in (
            "models/checkpoints", "models/diffusion_models", "models/para", "models/loras", "output", "input", "temp", "user")}
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)
        self.dirs.update(checkpoints=self.dirs["models/checkpoints"], diffusion_models=self.dirs["models/diffusion_models"],
                         para=self.dirs["models/para"], loras=self.dirs["models/loras"])
        self._built: dict[str, Any] = {}
        self._graphs = 0
        self.last_prompt: dict | None = None
        self._start()

    # ---- start ComfyUI ---------------------------------------------------------------------------
    def _start(self):
        if self.comfy_root not in sys.path:
            sys.path.insert(0, self.comfy_root)
        # ComfyUI's root goes first: the repo root (pytest's pythonpath, for `import para_core`) holds a `nodes/`
        # package that must not shadow ComfyUI's nodes.py.
        sys.path[:] = [self.comfy_root] + [p for p in sys.path if p != self.comfy_root]
        if REPO_ROOT not in [os.path.abspath(p or ".") for p in sys.path]:
            sys.path.append(REPO_ROOT)
        mod = sys.modules.get("nodes")
        if mod is not None and not os.path.abspath(getattr(mod, "__file__", "") or "").startswith(self.comfy_root):
            del sys.modules["nodes"]
        from comfy.cli_args import args
        args.cpu = True
        import folder_paths
        folder_paths.set_output_directory(self.dirs["output"])
        folder_paths.set_temp_directory(self.dirs["temp"])
        folder_paths.set_input_directory(self.dirs["input"])
        folder_paths.set_user_directory(self.dirs["user"])
        for kind in ("checkpoints", "diffusion_models", "loras", "para"):
            folder_paths.add_model_folder_path(kind, self.dirs[kind], is_default=True)
        import utils.extra_config  # noqa: F401  (before `import nodes`: nodes.py puts comfy/ first on sys.path)
        import execution
        import nodes
        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        if "PaRaLoader" not in nodes.NODE_CLASS_MAPPINGS:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            ok = asyncio.run(nodes.load_custom_node(REPO_ROOT, ignore=set(nodes.NODE_CLASS_MAPPINGS)))
            if not ok or "PaRaLoader" not in nodes.NODE_CLASS_MAPPINGS:
                raise RuntimeError(f"ComfyUI could not load the pack at {REPO_ROOT} (see the log above)")
            input_nodes.register(nodes.NODE_CLASS_MAPPINGS)
        self.server = _StubServer()
        # A large LRU: the whole suite runs in one process, and the `sd15` fixture's CheckpointLoaderSimple output must
        # stay the model later prompts get (test files with many model-free prompts, like the corpus, would push it
        # out of a small cache, and a reload gives new objects).
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.LRU, cache_args=_cache_args(LRU_SIZE))
        self._last_executor = self.executor

    # ---- running prompts ---------------------------------------------------------------------------
    def _execute(self, prompt: dict, fresh_cache: bool = False) -> tuple[bool, str, dict]:
        self.last_prompt = prompt
        executor = self.executor
        if fresh_cache:
            executor = self.execution.PromptExecutor(self.server, cache_type=self.execution.CacheType.CLASSIC,
                                                     cache_args=_cache_args(0))
        self._last_executor = executor
        pid = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            err = valid[1] or {}
            details = [f"{err.get('message', '')}: {err.get('details', '')}".strip(": ")]
            for nid, ne in (valid[3] or {}).items():
                for e in ne.get("errors", []):
                    details.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
            return False, "validation failed: " + " | ".join(details), {}
        self.server.messages.clear()
        executor.execute(prompt, pid, {}, valid[2])
        if executor.success:
            return True, "", executor.history_result["outputs"]
        errors = [d for ev, d in executor.status_messages if ev == "execution_error"]
        if errors:
            e = errors[-1]
            return False, f"{e['node_type']} (node {e['node_id']}): {e['exception_type']}: {str(e['exception_message']).strip()}", {}
        return False, "execution failed without an execution_error message", {}

    def run(self, prompt: dict, fresh_cache: bool = False) -> dict:
        """Run an API-format prompt; return its history outputs ({node_id: ui dict}). Raises on failure.

        Nodes whose inputs did not change since an earlier prompt come from ComfyUI's cache (an LRU of LRU_SIZE entries,
        so the tiny checkpoint stays loaded). fresh_cache=True runs this one prompt on a new executor with
        an empty cache: every node executes again (the session cache is kept for later prompts).
        """
        ok, msg, outputs = self._execute(prompt, fresh_cache)
        if not ok:
            raise AssertionError(f"ComfyUI prompt failed: {msg}")
        return outputs

    def run_failing(self, prompt: dict) -> str:
        """Run a prompt that must fail; return ComfyUI's error message ('Node (node id): Type: message')."""
        ok, msg, _ = self._execute(prompt)
        if ok:
            raise AssertionError("the prompt was expected to fail but succeeded")
        return msg

    def output(self, node_id: str, index: int = 0):
        """The Python value of output `index` of `node_id` after the last run (from ComfyUI's output cache)."""
        entry = self._last_executor.caches.outputs.get(str(node_id))
        if inspect.isawaitable(entry):  # newer ComfyUI: the output cache's `get` is a coroutine
            entry = asyncio.run(entry)
        if entry is None:
            raise KeyError(f"node {node_id} has no cached output (was it part of the last prompt?)")
        return entry.outputs[index][0]

    def graph(self, prefix: str | None = None):
        """comfy_execution.graph_utils.GraphBuilder: g.node(class, **inputs).out(i), g.finalize() -> prompt.

        Node ids are `<prefix><n>`; the default prefix is unique per call (ComfyUI moves GraphBuilder's own
        default prefix while it executes nodes, so it is not used).
        """
        from comfy_execution.graph_utils import GraphBuilder
        self._graphs += 1
        return GraphBuilder(prefix if prefix is not None else f"g{self._graphs}.")

    # ---- reading weights -----------------------------------------------------------------------------
    def patched_state_dict(self, patcher, keys=None) -> dict[str, torch.Tensor]:
        """Weights as ComfyUI bakes them (load_models_gpu with force_patch_weights, as CheckpointSave does).

        `patcher` is a ModelPatcher or a CLIP. Returns float copies of `keys` (default: all), then unloads
        every model, which restores the base weights from ComfyUI's backups.
        """
        import comfy.model_management as mm
        mp = getattr(patcher, "patcher", patcher)
        mm.unload_all_models()
        with torch.inference_mode():
            mm.load_models_gpu([mp], force_patch_weights=True, force_full_load=True)
            sd = mp.model.state_dict()
            out = {k: sd[k].detach().clone() for k in (keys if keys is not None else sd)}
        mm.unload_all_models()
        return out

    def base_state_dict(self, patcher, keys=None) -> dict[str, torch.Tensor]:
        """The current (unpatched) weights of the underlying torch model, after unloading everything."""
        import comfy.model_management as mm
        mp = getattr(patcher, "patcher", patcher)
        mm.unload_all_models()
        with torch.inference_mode():
            sd = mp.model.state_dict()
            return {k: sd[k].detach().clone() for k in (keys if keys is not None else sd)}

    # ---- files -----------------------------------------------------------------------------------------
    def write_para(self, name: str, stages: dict[str, list[torch.Tensor]], dtype=torch.float32, metadata=None,
                   folder: str = "para") -> str:
        """Write a PaRa file (bases need not be orthonormal) into a model folder; returns `name`."""
        from para_core.format import ParaModel
        path = os.path.join(self.dirs[folder], name)
        if os.path.exists(path):
            os.remove(path)
        ParaModel.from_bases(stages, metadata, dtype=dtype).save(path)
        return name

    def write_safetensors(self, folder: str, name: str, tensors: dict[str, torch.Tensor], metadata=None) -> str:
        """Write raw tensors with safetensors (any keys) into dirs[folder]; returns `name`."""
        import safetensors.torch
        path = os.path.join(self.dirs[folder], name)
        if os.path.exists(path):
            os.remove(path)
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
        return name

    def path(self, folder: str, name: str) -> str:
        return os.path.join(self.dirs[folder], name)

    # ---- tiny models --------------------------------------------------------------------------------
    def sd15_checkpoint(self) -> str:
        """File name (checkpoints folder) of a tiny SD1.5 checkpoint: UNet 18.7M, TAESD, full CLIP-L. Built once."""
        if "sd15_ckpt" not in self._built:
            unet = _tiny_sd15_unet_sd()
            sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
            sd.update({f"first_stage_model.{k}": v for k, v in _taesd_sd().items()})
            sd.update({f"cond_stage_model.{k[len('clip_l.'):]}": v for k, v in _clip_l_sd().items()})
            self._save(self.path("checkpoints", "tiny_sd15.safetensors"), sd, torch.float16)
            self._built["sd15_unet_tensors"] = unet
            self._built["sd15_ckpt"] = "tiny_sd15.safetensors"
        return self._built["sd15_ckpt"]

    def sd15_unet(self) -> str:
        """File name (diffusion_models folder) of the same tiny SD1.5 UNet, bare keys, fp16, for UNETLoader."""
        if "sd15_unet" not in self._built:
            self.sd15_checkpoint()
            self._save(self.path("diffusion_models", "tiny_sd15_unet.safetensors"), self._built["sd15_unet_tensors"], torch.float16)
            self._built["sd15_unet"] = "tiny_sd15_unet.safetensors"
        return self._built["sd15_unet"]

    def sd3_unet(self) -> str:
        """File name (diffusion_models folder) of a tiny SD3 MMDiT (depth 2, hidden 128, 1.9M params), fp32."""
        if "sd3" not in self._built:
            from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
            import comfy.ops
            m = MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=2048,
                      context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
                      pos_embed_max_size=16, num_patches=256, pos_embed_scaling_factor=None,
                      operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
            self._save(self.path("diffusion_models", "tiny_sd3.safetensors"), _init_sd(m), torch.float32)
            self._built["sd3"] = "tiny_sd3.safetensors"
        return self._built["sd3"]

    def flux_model(self):
        """A tiny Flux ModelPatcher (hidden 64, 2 heads, 1 double + 1 single block) built directly: its
        `double_blocks.N.img_attn.qkv` and `single_blocks.N.linear1` are fused, so diffusers / linear1_qkv
        names map to (key, offset) patches. A fresh clone of one model per call."""
        if "flux" not in self._built:
            import comfy.model_detection
            import comfy.model_patcher
            import comfy.supported_models
            h, meta = 64, torch.device("meta")
            keys = {"img_in.weight": (h, 64), "txt_in.weight": (h, 32), "vector_in.in_layer.weight": (h, 32),
                    "double_blocks.0.img_attn.norm.key_norm.scale": (h // 2,), "single_blocks.0.linear1.weight": (h * 7, h)}
            fake = {f"diffusion_model.{k}": torch.empty(s, device=meta) for k, s in keys.items()}
            cfg = comfy.model_detection.detect_unet_config(fake, "diffusion_model.")
            cfg.update(num_heads=2, axes_dim=[8, 12, 12])
            mc = comfy.supported_models.Flux(cfg)
            mc.set_inference_dtype(torch.float32, None)
            model = mc.get_model({}, "", device="cpu")
            _init_sd(model.diffusion_model)
            self._built["flux"] = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
        return self._built["flux"].clone()

    @staticmethod
    def _save(path: str, sd: dict[str, torch.Tensor], dtype) -> None:
        import safetensors.torch
        safetensors.torch.save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, path)

    # ---- example workflows (UI format -> API prompt) ---------------------------------------------------
    def saved_images(self, prompt: dict, ui: dict) -> list[str]:
        """Paths of the images every SaveImage node of `prompt` wrote in the run that returned `ui`; asserts
        that there is at least one SaveImage, that each wrote an image, and that the files exist."""
        saves = [nid for nid, v in prompt.items() if v["class_type"] == "SaveImage"]
        assert saves and all(ui[nid]["images"] for nid in saves), f"no saved images from SaveImage nodes {saves}"
        paths = [os.path.join(self.dirs["output"], img["subfolder"], img["filename"]) for nid in saves for img in ui[nid]["images"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        assert not missing, f"SaveImage reported files that do not exist: {missing}"
        return paths

    def workflow_to_prompt(self, workflow: dict | str, values: dict | None = None, overrides: dict | None = None) -> dict:
        """Convert a UI-format workflow (what the frontend saves) to an API prompt.

        widgets_values are mapped to the node's widget inputs in schema order (required, then optional;
        a seed with control_after_generate takes two slots; optional widgets after the last value keep their
        defaults, as the front end does for a workflow saved before they existed); links become [node_id, slot]; Note nodes and
        muted/bypassed nodes are dropped. `values` replaces widget values ({old: new}, e.g. file names);
        `overrides` sets inputs per class ({class_type: {input: value}}).
        """
        if isinstance(workflow, str):
            with open(workflow, encoding="utf-8") as f:
                workflow = json.load(f)
        values, overrides = values or {}, overrides or {}
        links = {ln[0]: ln for ln in workflow.get("links", [])}
        prompt = {}
        for node in workflow["nodes"]:
            ctype = node["type"]
            if ctype in ("Note", "MarkdownNote") or node.get("mode", 0) in (2, 4):
                continue
            cls = self.nodes.NODE_CLASS_MAPPINGS.get(ctype)
            if cls is None:
                raise KeyError(f"workflow node {node['id']} has unknown type {ctype}")
            spec = cls.INPUT_TYPES()
            widgets = list(node.get("widgets_values") or [])
            inputs: dict[str, Any] = {}
            for section in ("required", "optional"):
                for name, s in spec.get(section, {}).items():
                    typ, opts = s[0], (s[1] if len(s) > 1 else {})
                    if not _is_widget(typ, opts):
                        continue
                    if not widgets:
                        if section == "optional":  # a workflow saved before the input existed: the front end uses its default
                            continue
                        raise ValueError(f"workflow node {node['id']} ({ctype}): no widget value left for input '{name}'")
                    v = widgets.pop(0)
                    inputs[name] = values.get(v, v) if isinstance(v, str) else v
                    if opts.get("control_after_generate") or (typ == "INT" and name in ("seed", "noise_seed")):
                        widgets.pop(0)  # the 'fixed/randomize/...' control widget
            if widgets:
                raise ValueError(f"workflow node {node['id']} ({ctype}): {len(widgets)} widget values left over: {widgets}")
            for inp in node.get("inputs", []):
                if inp.get("link") is not None:
                    ln = links[inp["link"]]
                    inputs[inp["name"]] = [str(ln[1]), ln[2]]
            inputs.update(overrides.get(ctype, {}))
            prompt[str(node["id"])] = {"class_type": ctype, "inputs": inputs}
        return prompt


def _is_widget(typ, opts) -> bool:
    if isinstance(typ, list):
        return True
    return typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def write_subject_images(folder: str, n: int, seed: int) -> None:
    """n 64x64 PNG "photos" of a subject (a coloured blob on noise), deterministic in `seed`, for dataset inputs."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(n):
        cx, cy = rng.integers(16, 48, size=2)
        blob = ((xx - cx) ** 2 + (yy - cy) ** 2 < 150)[..., None] * rng.integers(60, 255, size=3)
        img = (blob + rng.integers(0, 40, size=(64, 64, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"img_{i}.png"))


# ---- random weights ---------------------------------------------------------------------------------
def _init_sd(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Explicit init (ComfyUI ops leave weights uninitialised): N(0, 1/fan_in) matrices, norms 1, small biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=GEN) / fan_in ** 0.5)
            elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", ".scale")) or "layer_norm" in name or "ln_" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=GEN) * 0.02)
        persistent = set(module.state_dict())
        for name, b in module.named_buffers():
            if not b.is_floating_point() or b.device.type == "meta":
                continue
            if name in persistent and b.ndim >= 2:  # checkpoint-loaded tables left torch.empty (e.g. SD3 pos_embed)
                b.copy_(torch.randn(b.shape, generator=GEN) * 0.02)
            elif not torch.isfinite(b).all():
                b.zero_()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _tiny_sd15_unet_sd() -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    m = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
                  transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-2, context_dim=768,
                  num_heads=8, num_head_channels=-1, use_linear_in_transformer=False, use_spatial_transformer=True,
                  legacy=False, adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False,
                  operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    sd = _init_sd(m)
    for k in sd:  # GroupNorm / LayerNorm weights in the UNet are named in_layers.0, out_layers.0, norm, norm1..3
        if k.endswith("weight") and sd[k].ndim == 1:
            sd[k].fill_(1.0)
    return sd


def _taesd_sd() -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd
    m = comfy.taesd.taesd.TAESD()
    sd = _init_sd(m)
    sd["vae_scale"] = torch.tensor(1.0)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def _clip_l_sd() -> dict[str, torch.Tensor]:
    import comfy.sd1_clip
    m = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    sd = _init_sd(m)
    for k in sd:
        if "embeddings" in k:
            sd[k].mul_(0.02 * sd[k].shape[-1] ** 0.5)  # token/position embeddings: N(0, 0.02²)
        elif k.endswith("weight") and sd[k].ndim == 1:
            sd[k].fill_(1.0)
    return sd



def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality, NaN payloads included. ComfyUI leaves weights a checkpoint does not have as
    uninitialised memory (SD1.5's CLIP text_projection, which SD1.5 never uses), and torch.equal calls such
    a tensor unequal to its own copy whenever the garbage holds a NaN."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8)))


logging.getLogger(__name__).debug("harness imported")
