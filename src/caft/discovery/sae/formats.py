"""Reading SAEs from the layouts they are published in, behind one function: `load_sae`.

Each format is a small class with `name`, `files` (what its folder holds, for messages),
`detect(folder) -> bool` and `load(folder, dtype=...) -> SparseAutoencoder`; `FORMATS` is the
registry `load_sae` tries in order:

- caft's own: `sae.json` + `sae.safetensors` (`SparseAutoencoder.save`);
- SAELens: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in],
  b_enc, b_dec, JumpReLU `threshold`); config keys of 6.x (`metadata.hook_name`) and earlier
  (top-level `hook_name` / `hook_point`, `activation_fn_kwargs.k`);
- EleutherAI sparsify: one folder per hookpoint (`layers.12`) with `cfg.json` (d_in, num_latents,
  k) + `sae.safetensors` (encoder.weight [num_latents, d_in], encoder.bias, W_dec
  [num_latents, d_in], b_dec); TopK of ReLU(encoder(x - b_dec));
- dictionary_learning: `ae.pt` (a state dict: encoder.weight [d_sae, d_in], encoder.bias,
  decoder.weight [d_in, d_sae], b_dec, k, threshold) + `config.json` (`trainer`: layer, k,
  activation_dim, dict_size, dict_class); BatchTopKSAE, AutoEncoderTopK and AutoEncoder;
- Gemma Scope: `params.npz` (W_enc, W_dec, b_enc, b_dec, threshold), JumpReLU without subtracting
  b_dec; the layer comes from the path (`layer_12/width_16k/average_l0_82`) or `hook_layer=`.

`.pt` files are read with `torch.load(weights_only=True)`: pickled code is refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from caft.discovery.sae.base import (
    FORMAT_NAME,
    RESID_POST,
    SAELENS_CFG_FILE,
    SAELENS_WEIGHTS_FILE,
    SIDECAR_FILE,
    TENSORS_FILE,
    SparseAutoencoder,
)
from caft.errors import CaftError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


# dictionary_learning: dict_class -> (activation, key of b_dec in the state dict); trainer -> class
_DL_DICT_CLASS = {
    "BatchTopKSAE": ("batchtopk", "b_dec"),
    "AutoEncoderTopK": ("topk", "b_dec"),
    "AutoEncoder": ("relu", "bias"),
}
_DL_TRAINER_CLASS = {
    "BatchTopKTrainer": "BatchTopKSAE",
    "TopKTrainer": "AutoEncoderTopK",
    "StandardTrainer": "AutoEncoder",
}


# ---- the formats ------------------------------------------------------------------------------
class CaftFormat:
    name = "caft"
    files = f"{SIDECAR_FILE} + {TENSORS_FILE} (SparseAutoencoder.save)"

    @staticmethod
    def detect(folder: Path) -> bool:
        sidecar = folder / SIDECAR_FILE
        if not sidecar.is_file() or not (folder / TENSORS_FILE).is_file():
            return False
        try:
            return json.loads(sidecar.read_text()).get("format") == FORMAT_NAME
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return False

    @staticmethod
    def load(folder: Path, *, dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
        sidecar = _read_json(folder / SIDECAR_FILE)
        version = sidecar.get("format_version")
        if version != 1:
            raise CaftError(f"{folder / SIDECAR_FILE}: unsupported format_version {version!r}.")
        path = folder / TENSORS_FILE
        tensors = _read_safetensors(path)
        _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
        metadata = dict(sidecar.get("metadata") or {})
        metadata["format"] = "caft"
        return SparseAutoencoder(
            tensors["W_enc"],
            tensors["b_enc"],
            tensors["W_dec"],
            tensors["b_dec"],
            activation=sidecar.get("activation", "relu"),
            k=sidecar.get("k"),
            threshold=tensors.get("threshold"),
            apply_b_dec_to_input=sidecar.get("apply_b_dec_to_input", True),
            hook_layer=sidecar.get("hook_layer"),
            hook_site=sidecar.get("hook_site") or RESID_POST,
            input_normalization=sidecar.get("input_normalization"),
            metadata=metadata,
            source=str(path),
            dtype=dtype,
        )


class SAELensFormat:
    name = "saelens"
    files = f"{SAELENS_CFG_FILE} + {SAELENS_WEIGHTS_FILE}"

    @staticmethod
    def detect(folder: Path) -> bool:
        return (folder / SAELENS_CFG_FILE).is_file() and (folder / SAELENS_WEIGHTS_FILE).is_file()

    @staticmethod
    def load(folder: Path, *, dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
        cfg_path, path = folder / SAELENS_CFG_FILE, folder / SAELENS_WEIGHTS_FILE
        cfg = _read_json(cfg_path)
        meta = {**cfg, **(cfg.get("metadata") or cfg.get("meta") or {})}
        tensors = _read_safetensors(path)
        _require(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
        architecture = cfg.get("architecture", "standard")
        activation_fn = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
        fn_kwargs = cfg.get("activation_fn_kwargs") or {}
        k = threshold = None
        if architecture == "topk" or (architecture == "standard" and activation_fn == "topk"):
            activation, k = "topk", cfg.get("k", fn_kwargs.get("k"))
        elif architecture == "standard" and activation_fn == "relu":
            activation = "relu"
        elif architecture == "jumprelu":
            activation = "jumprelu"
            if "threshold" in tensors:
                threshold = tensors["threshold"]
            elif "log_threshold" in tensors:
                threshold = tensors["log_threshold"].exp()
            else:
                raise CaftError(f"{path}: a JumpReLU SAE needs a 'threshold' tensor; it has none.")
        else:
            raise CaftError(
                f"{cfg_path}: SAELens architecture {architecture!r} with activation "
                f"{activation_fn!r} is not supported; caft reads 'standard' (ReLU), 'topk' and "
                "'jumprelu' SAEs."
            )
        W_dec = _fold_scaling_factor(tensors, path)
        _check_declared(
            cfg_path, tensors["W_enc"], d_in=cfg.get("d_in"), d_sae=cfg.get("d_sae"), key="W_enc"
        )
        hook_name = meta.get("hook_name") or meta.get("hook_point")
        layer, site = parse_hook_name(hook_name)
        if layer is None and isinstance(meta.get("hook_layer"), int) and not hook_name:
            layer = meta["hook_layer"]
        if meta.get("hook_head_index") is not None:
            site = f"head {meta['hook_head_index']} of {hook_name}"
        normalization = cfg.get("normalize_activations")
        if normalization in (None, False, "none"):
            normalization = None
        elif normalization is True:
            normalization = "expected_average_only_in"
        return SparseAutoencoder(
            tensors["W_enc"],
            tensors["b_enc"],
            W_dec,
            tensors["b_dec"],
            activation=activation,
            k=k,
            threshold=threshold,
            apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
            hook_layer=layer,
            hook_site=site,
            input_normalization=normalization,
            metadata={
                "format": "saelens",
                "hook_name": hook_name,
                "model_name": meta.get("model_name"),
                "architecture": architecture,
            },
            source=str(path),
            dtype=dtype,
        )


class SparsifyFormat:
    name = "sparsify"
    files = "cfg.json + sae.safetensors (one folder per hookpoint, e.g. layers.12)"

    @staticmethod
    def detect(folder: Path) -> bool:
        return (folder / "cfg.json").is_file() and (folder / "sae.safetensors").is_file()

    @staticmethod
    def load(folder: Path, *, dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
        cfg_path, path = folder / "cfg.json", folder / "sae.safetensors"
        cfg = _read_json(cfg_path)
        for flag in ("transcode", "skip_connection"):
            if cfg.get(flag):
                raise CaftError(
                    f"{cfg_path}: {flag} is set: this is not a plain sparse autoencoder (caft "
                    "reads sparsify SAEs that reconstruct their own input)."
                )
        if cfg.get("activation", "topk") != "topk":
            raise CaftError(
                f"{cfg_path}: activation {cfg['activation']!r} is not supported (only 'topk')."
            )
        if "d_in" not in cfg or "k" not in cfg:
            raise CaftError(f"{cfg_path}: a sparsify cfg.json needs 'd_in' and 'k'.")
        tensors = _read_safetensors(path)
        _require(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
        encoder = tensors["encoder.weight"]
        d_sae = cfg.get("num_latents") or cfg["d_in"] * cfg.get("expansion_factor", 0)
        _check_declared(cfg_path, encoder.T, d_in=cfg["d_in"], d_sae=d_sae, key="encoder.weight.T")
        layer, site = _sparsify_hookpoint(folder.name)
        return SparseAutoencoder(
            encoder.T,
            tensors["encoder.bias"],
            tensors["W_dec"],
            tensors["b_dec"],
            activation="topk",
            k=cfg["k"],
            apply_b_dec_to_input=True,
            hook_layer=layer,
            hook_site=site,
            metadata={"format": "sparsify", "hook_name": folder.name},
            source=str(path),
            dtype=dtype,
        )


class DictionaryLearningFormat:
    name = "dictionary_learning"
    files = "ae.pt + config.json (BatchTopKSAE, AutoEncoderTopK or AutoEncoder)"

    @staticmethod
    def detect(folder: Path) -> bool:
        return (folder / "ae.pt").is_file() and (folder / "config.json").is_file()

    @staticmethod
    def load(folder: Path, *, dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
        cfg_path, path = folder / "config.json", folder / "ae.pt"
        trainer = _read_json(cfg_path).get("trainer")
        if not isinstance(trainer, dict):
            raise CaftError(f"{cfg_path}: no 'trainer' section (not a dictionary_learning config).")
        dict_class = trainer.get("dict_class") or _DL_TRAINER_CLASS.get(
            trainer.get("trainer_class", "")
        )
        if dict_class not in _DL_DICT_CLASS:
            raise CaftError(
                f"{cfg_path}: dictionary class {dict_class!r} is not supported; caft reads "
                f"{', '.join(_DL_DICT_CLASS)}."
            )
        activation, b_dec_key = _DL_DICT_CLASS[dict_class]
        state = read_pt_state_dict(path)
        keys = ["encoder.weight", "encoder.bias", "decoder.weight", b_dec_key]
        if activation == "batchtopk":
            keys.append("threshold")
        _require(state, keys, path)
        encoder, decoder = state["encoder.weight"], state["decoder.weight"]
        _check_declared(
            cfg_path,
            encoder.T,
            d_in=trainer.get("activation_dim"),
            d_sae=trainer.get("dict_size"),
            key="encoder.weight.T",
        )
        k = None
        if activation != "relu":
            k = int(state["k"]) if "k" in state else trainer.get("k")
        layer = trainer.get("layer")
        submodule = str(trainer.get("submodule_name") or "")
        site = RESID_POST
        if submodule and "resid" not in submodule:
            site = submodule
        return SparseAutoencoder(
            encoder.T,
            state["encoder.bias"],
            decoder.T,
            state[b_dec_key],
            activation=activation,
            k=k,
            threshold=state.get("threshold") if activation == "batchtopk" else None,
            apply_b_dec_to_input=True,
            hook_layer=layer if isinstance(layer, int) else None,
            hook_site=site,
            metadata={
                "format": "dictionary_learning",
                "dict_class": dict_class,
                "hook_name": submodule or (f"layer {layer}" if layer is not None else None),
                "model_name": trainer.get("lm_name"),
            },
            source=str(path),
            dtype=dtype,
        )


class GemmaScopeFormat:
    name = "gemma_scope"
    files = "params.npz (Gemma Scope JumpReLU)"

    @staticmethod
    def detect(folder: Path) -> bool:
        return (folder / "params.npz").is_file()

    @staticmethod
    def load(folder: Path, *, dtype: torch.dtype = torch.float32) -> SparseAutoencoder:
        path = folder / "params.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: np.asarray(data[key]) for key in data.files}
        except (OSError, ValueError, EOFError) as error:
            raise CaftError(f"{path}: not a readable .npz file ({error}).") from error
        # Some copies spell the weights w_enc / w_dec.
        arrays = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in arrays.items()}
        _require(arrays, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path)
        layer, site = _gemma_scope_hook(folder)
        return SparseAutoencoder(
            torch.from_numpy(arrays["W_enc"]),
            torch.from_numpy(arrays["b_enc"]),
            torch.from_numpy(arrays["W_dec"]),
            torch.from_numpy(arrays["b_dec"]),
            activation="jumprelu",
            threshold=torch.from_numpy(arrays["threshold"]),
            apply_b_dec_to_input=False,
            hook_layer=layer,
            hook_site=site,
            metadata={
                "format": "gemma_scope",
                "hook_name": (
                    f"blocks.{layer}.hook_resid_post"
                    if layer is not None and site == RESID_POST
                    else site
                ),
            },
            source=str(path),
            dtype=dtype,
        )


FORMATS = (CaftFormat, SAELensFormat, SparsifyFormat, DictionaryLearningFormat, GemmaScopeFormat)


# ---- entry point ------------------------------------------------------------------------------
def detect_format(folder: str | Path):
    """The format class whose files `folder` holds, or None."""
    folder = Path(folder)
    return next((fmt for fmt in FORMATS if fmt.detect(folder)), None)


def load_sae(
    source: str | Path,
    *,
    sae_id: str | None = None,
    hook_layer: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> SparseAutoencoder:
    """Load an SAE from a local folder (or a file in it), a Hugging Face repo id, or a SAELens
    release name.

    `sae_id` picks one SAE inside a folder or repo that holds several (a sub-folder such as
    `layers.12` or `layer_12/width_16k/average_l0_82`; for a SAELens release, its SAE id).
    `hook_layer` is the decoder layer the SAE must read: it fills in a layer the files do not state
    (Gemma Scope outside its usual path) and is checked against one they do.
    Local paths never touch the network; a Hub id needs it, or the local Hub cache.
    """
    folder = _resolve(source, sae_id=sae_id, hook_layer=hook_layer)
    fmt = detect_format(folder)
    if fmt is None:
        raise CaftError(_unknown_format_message(folder))
    sae = fmt.load(folder, dtype=dtype)
    if hook_layer is not None:
        if sae.hook_layer is None:
            sae.hook_layer = int(hook_layer)
        else:
            sae._check_layer(int(hook_layer))
    return sae


def _resolve(source: str | Path, *, sae_id: str | None, hook_layer: int | None) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        known = {"sae.json", "sae.safetensors", "cfg.json", SAELENS_WEIGHTS_FILE, "ae.pt"}
        known |= {"config.json", "params.npz"}
        if path.name not in known:
            raise CaftError(_unknown_format_message(path))
        path = path.parent
    if path.is_dir():
        return _pick_sae_folder(path, sae_id=sae_id, hook_layer=hook_layer)
    text = str(source)
    if _HUB_ID.match(text):
        return _pick_sae_folder(
            _hub_snapshot(text, sae_id), sae_id=sae_id, hook_layer=hook_layer, where=text
        )
    if "/" not in text and os.sep not in text and not path.suffix:
        repo_id, folder = _saelens_release(text, sae_id)
        return _pick_sae_folder(_hub_snapshot(repo_id, folder), sae_id=folder, hook_layer=None)
    raise CaftError(
        f"SAE not found: {source} is not a local folder. Pass an SAE folder, a Hugging Face repo id "
        "(owner/name) or a SAELens release name."
    )


def _pick_sae_folder(
    root: Path, *, sae_id: str | None, hook_layer: int | None, where: str = ""
) -> Path:
    """`root/sae_id`, or `root` itself, or the one SAE sub-folder that fits `hook_layer`."""
    where = where or str(root)
    if sae_id:
        folder = root / sae_id
        if not folder.is_dir():
            raise CaftError(f"{where} has no SAE folder {sae_id!r}.")
        return folder
    if detect_format(root) is not None:
        return root
    saes = [d for d in sorted(root.iterdir()) if d.is_dir() and detect_format(d)]
    fitting = (
        saes if hook_layer is None else [d for d in saes if _layer_in_name(d.name) == hook_layer]
    )
    if len(fitting) == 1:
        return fitting[0]
    if fitting:
        names = ", ".join(d.name for d in fitting[:10])
        raise CaftError(f"{where} holds several SAEs ({names}); choose one with sae_id=.")
    if saes:
        names = ", ".join(d.name for d in saes[:10])
        raise CaftError(f"{where} holds no SAE for layer {hook_layer} (it has: {names}).")
    return root  # reported as an unknown format by the caller


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    if any(str(flag).strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags if flag):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _hub_snapshot(repo_id: str, subfolder: str | None) -> Path:
    """Download (or find in the local cache) a repo, or only `subfolder` of it."""
    hint = (
        "Download the SAE on a machine with access and pass its local folder instead "
        "(load_sae('path/to/folder'))."
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CaftError(
            f"{repo_id!r} is not a local folder, and huggingface_hub is not installed to fetch it "
            f"from the Hub. {hint}"
        ) from None
    offline = _hub_offline()
    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    try:
        root = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
    except Exception as error:  # network, offline mode, missing or gated repo: all end here
        kind = type(error).__name__
        if kind in {"RepositoryNotFoundError", "GatedRepoError"}:
            raise CaftError(
                f"{repo_id!r} is not a local folder, and the Hugging Face Hub has no accessible repo "
                f"by that name ({kind}). {hint}"
            ) from error
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else f"{kind}: {error}"
        raise CaftError(
            f"{repo_id!r} is not a local folder, and the Hugging Face Hub is unreachable ({why}); "
            f"it is not in the local cache either. {hint}"
        ) from error
    return Path(root)


def _saelens_release(release: str, sae_id: str | None) -> tuple[str, str]:
    """(repo id, folder) of a SAELens release's SAE, from the sae_lens package's directory."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        try:
            from sae_lens.toolkit.pretrained_saes_directory import get_pretrained_saes_directory
        except ImportError:
            raise CaftError(
                f"SAE not found: {release!r} is not a local folder or a Hugging Face repo id "
                "(owner/name). Resolving SAELens release names needs the sae_lens package "
                "(pip install sae-lens); or pass a local folder."
            ) from None
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise CaftError(
            f"SAE not found: {release!r} is not a local folder, a Hugging Face repo id or a "
            "SAELens release name."
        )
    saes = directory[release].saes_map
    if sae_id not in saes:
        shown = ", ".join(list(saes)[:5])
        raise CaftError(
            f"SAELens release {release!r} needs sae_id= one of its SAEs (e.g. {shown}); "
            f"got {sae_id!r}."
        )
    return directory[release].repo_id, saes[sae_id]


# ---- readers and checks -----------------------------------------------------------------------
def read_pt_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.pt` state dict, loaded with weights_only=True: anything but tensors is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for code, RuntimeError/EOFError for bad files
        raise CaftError(
            f"{path}: refused to load: it is not a plain state dict of tensors (read with "
            f"torch.load(weights_only=True), which never runs pickled code). {error}".strip()
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CaftError(f"{path}: expected a state dict of tensors, got {type(state).__name__}.")
    return dict(state)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaftError(f"{path}: invalid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise CaftError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # SafetensorError has no stable import path
        raise CaftError(f"{path}: not a readable safetensors file ({error}).") from error


def _require(tensors, keys, path: Path) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise CaftError(
            f"{path}: missing {', '.join(missing)} (it has: {', '.join(sorted(tensors)) or 'none'})"
            "; is this the right format?"
        )


def _check_declared(cfg_path: Path, W_enc: torch.Tensor, *, d_in, d_sae, key: str) -> None:
    """The config's declared sizes must match the weights'."""
    shape = tuple(W_enc.shape)
    if len(shape) != 2:
        raise CaftError(f"{cfg_path}: {key} must be a matrix, got shape {shape}.")
    for name, declared, actual in (("d_in", d_in, shape[0]), ("d_sae", d_sae, shape[1])):
        if declared and int(declared) != actual:
            raise CaftError(
                f"{cfg_path}: declares {name}={declared} but the weights have {actual} "
                f"({key} is {list(shape)})."
            )


def _fold_scaling_factor(tensors: dict, path: Path) -> torch.Tensor:
    """Older SAELens files may carry a per-latent `scaling_factor` applied before decoding."""
    W_dec = tensors["W_dec"]
    scale = tensors.get("scaling_factor", tensors.get("finetuning_scaling_factor"))
    if scale is None or torch.allclose(scale.float(), torch.ones_like(scale.float())):
        return W_dec
    if scale.shape != W_dec.shape[:1]:
        raise CaftError(f"{path}: scaling_factor has shape {tuple(scale.shape)}.")
    return W_dec * scale[:, None].to(W_dec.dtype)


def parse_hook_name(hook_name: str | None) -> tuple[int | None, str]:
    """(decoder layer, site) of a TransformerLens hook name.

    `blocks.L.hook_resid_post` is the output of decoder layer L; `blocks.L.hook_resid_pre` is the
    output of layer L-1 (the embeddings for L = 0). Other hooks keep their own site name.
    """
    if not hook_name:
        return None, RESID_POST
    match = _BLOCK_HOOK.match(hook_name)
    if not match:
        return None, hook_name
    layer, site = int(match.group(1)), match.group(2)
    if site == "hook_resid_post":
        return layer, RESID_POST
    if site == "hook_resid_pre":
        return (layer - 1, RESID_POST) if layer > 0 else (None, "embeddings")
    return layer, site.removeprefix("hook_")


def _sparsify_hookpoint(name: str) -> tuple[int | None, str]:
    match = re.fullmatch(r"(?:model\.)?(?:layers|h|blocks)\.(\d+)(\..+)?", name)
    if not match:
        return None, RESID_POST if name != "embed_tokens" else "embeddings"
    return int(match.group(1)), RESID_POST if match.group(2) is None else name


def _gemma_scope_hook(folder: Path) -> tuple[int | None, str]:
    text = str(folder.resolve()).replace(os.sep, "/")
    match = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", text)
    layer = int(match.group(1)) if match else None
    site = RESID_POST
    if re.search(r"gemma-scope[\w.-]*-mlp", text):
        site = "mlp_out"
    elif re.search(r"gemma-scope[\w.-]*-att", text):
        site = "attn.hook_z"
    elif "embedding" in text:
        site = "embeddings"
    return layer, site


def _layer_in_name(name: str) -> int | None:
    match = re.search(r"(?:^|[._/])(?:layers?|h|blocks)[._](\d+)$", name) or re.search(
        r"layer_(\d+)", name
    )
    return int(match.group(1)) if match else None


def _unknown_format_message(path: Path) -> str:
    layouts = "; ".join(f"{fmt.name}: {fmt.files}" for fmt in FORMATS)
    present = ""
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())[:12]
        present = f" It holds: {', '.join(names) or 'nothing'}."
    return f"{path} is not an SAE in a format caft reads.{present} Expected one of: {layouts}."


__all__ = [
    "FORMATS",
    "CaftFormat",
    "DictionaryLearningFormat",
    "GemmaScopeFormat",
    "SAELensFormat",
    "SparsifyFormat",
    "detect_format",
    "load_sae",
    "parse_hook_name",
    "read_pt_state_dict",
]
