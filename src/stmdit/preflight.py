"""`stmdit preflight`: check a configuration's weights in seconds, before any job is queued.

For every encoder with `impl: real` and every model with `pretrained` weights it checks, without
loading a tensor into memory: that the weights exist (hub ids only when the hub is allowed), that
the files a loader needs are there (config.json, args.json, vocab.json), that every key name and
shape of the checkpoint (safetensors header, or a memory-mapped torch file on the meta device)
matches the architecture the loader builds (built on the meta device), and that preprocessing
overrides agree with the model card. It prints one table (encoder, weights, status, first
problem) and exits non-zero on any problem. The workflow runs the same check at start.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from stmdit.encoders.base import (
    checkpoint_shapes,
    compare_shapes,
    find_weights_file,
    read_json,
    resolve_weights,
)
from stmdit.errors import InputError


@dataclass(frozen=True)
class Check:
    name: str
    weights: str
    status: str  # ok | hub | FAIL
    problem: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the module `build` makes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def require_match(path: Path, expected: dict, found: dict) -> None:
    problems = compare_shapes(expected, found)
    if problems:
        raise InputError(path, "checkpoint does not match the architecture: " + "; ".join(problems))


def card_preprocessing(name: str, arch: dict, card: dict) -> None:
    """Preprocessing overrides must agree with the model card."""
    for key, value in card.items():
        if key in arch and _differs(arch[key], value):
            raise InputError(None, f"features.encoders.{name}.arch.{key} = {arch[key]!r} differs from the model "
                                   f"card's {value!r}")


def _differs(a: Any, b: Any) -> bool:
    if isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(b, float):
        return abs(float(a) - b) > 1e-6
    return a != b


# ---------------------------------------------------------------------------------------------
# Per loader family


def check_timm(name: str, entry: dict, allow_hub: bool) -> str:
    import timm

    from stmdit.encoders.vit import check_timm_config, deepspot_backbone, split_arch, timm_kwargs
    from stmdit.encoders import vit

    spec = deepspot_backbone(entry.get("variant")) if name == "deepspot_fm" else {"uni2h": vit.UNI2H,
                                                                                    "h0mini": vit.H0MINI}[name]
    arch = dict(entry.get("arch") or {})
    card_preprocessing(name, arch, {"mean": spec.mean, "std": spec.std, "interpolation": spec.interpolation})
    source = resolve_weights(name, entry.get("weights"), spec.hub_id, allow_hub)
    if source.kind == "hub":
        return "hub"
    architecture, overrides, _ = split_arch(arch)
    weights_file = find_weights_file(source.path)
    kwargs = dict(spec.kwargs)
    config_file = weights_file.parent / "config.json"
    if config_file.is_file():
        config = read_json(config_file)
        check_timm_config(config_file, config, spec, architecture, overrides)
        for key, value in (config.get("model_args") or {}).items():
            kwargs.setdefault(key, value)
    kwargs.update(overrides)
    expected = meta_shapes(lambda: timm.create_model(architecture or spec.architecture, pretrained=False,
                                                     **timm_kwargs(kwargs)))
    require_match(weights_file, expected, checkpoint_shapes(weights_file))
    return str(weights_file)


def check_sd3_vae(name: str, entry: dict, allow_hub: bool) -> str:
    from diffusers import AutoencoderKL

    from stmdit.encoders.sd3_vae import HUB_ID, SD3_SCALE, SD3_SHIFT

    arch = dict(entry.get("arch") or {})
    card_preprocessing(name, arch, {"shift_factor": SD3_SHIFT, "scaling_factor": SD3_SCALE})
    source = resolve_weights(name, entry.get("weights"), HUB_ID, allow_hub)
    if source.kind == "hub":
        return "hub"
    folder = source.path
    if arch.get("subfolder"):
        folder = folder / arch["subfolder"]
    elif (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise InputError(folder / "config.json", "missing: a diffusers VAE folder needs its config.json")
    config = read_json(folder / "config.json")
    weights = [folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
    weights_file = next((w for w in weights if w.is_file()), None)
    if weights_file is None:
        raise InputError(folder, "no diffusion_pytorch_model.safetensors (or .bin) beside config.json")
    expected = meta_shapes(lambda: AutoencoderKL.from_config(config))
    require_match(weights_file, expected, checkpoint_shapes(weights_file))
    if config.get("latent_channels") != 16:
        raise InputError(folder / "config.json", f"latent_channels is {config.get('latent_channels')}; SD3's VAE has 16")
    return str(weights_file)


def check_midnight(name: str, entry: dict, allow_hub: bool) -> str:
    from transformers import AutoConfig, AutoModel

    from stmdit.encoders.midnight import HUB_ID, MEAN, STD

    card_preprocessing(name, dict(entry.get("arch") or {}), {"mean": MEAN, "std": STD})
    source = resolve_weights(name, entry.get("weights"), HUB_ID, allow_hub)
    if source.kind == "hub":
        return "hub"
    folder = source.path if source.path.is_dir() else source.path.parent
    if not (folder / "config.json").is_file():
        raise InputError(folder / "config.json", "missing: a transformers model folder needs its config.json")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # unknown model type, bad JSON
        raise InputError(folder / "config.json", f"not a transformers config: {str(exc).splitlines()[0]}") from None
    weights_file = find_weights_file(folder)
    expected = meta_shapes(lambda: AutoModel.from_config(config))
    found = checkpoint_shapes(weights_file)
    prefix = f"{config.model_type}."  # checkpoints saved from a task model carry the base prefix
    if found and all(k.startswith(prefix) for k in found):
        found = {k[len(prefix):]: v for k, v in found.items()}
    require_match(weights_file, expected, found)
    return str(weights_file)


def check_cancerfoundation(name: str, entry: dict, allow_hub: bool) -> str:
    from stmdit.encoders.cancerfoundation import (
        CHECKPOINT_FILES,
        CancerFoundationArgs,
        CancerFoundationModel,
        canonical_state_dict,
        load_vocab,
    )

    if not entry.get("weights"):
        raise InputError(None, "impl real needs weights: the folder with model.pth, args.json and vocab.json")
    directory = Path(entry["weights"]).expanduser()
    if not directory.is_dir():
        raise InputError(directory, "CancerFoundation weights folder not found (it has no hub id)")
    for file in CHECKPOINT_FILES:
        if not (directory / file).is_file():
            raise InputError(directory / file, "missing: a CancerFoundation folder holds model.pth, args.json, vocab.json")
    arch = dict(entry.get("arch") or {})
    args = CancerFoundationArgs.from_dict({**read_json(directory / "args.json"), **arch}, directory / "args.json")
    vocab = load_vocab(directory / "vocab.json")
    checkpoint = directory / "model.pth"
    found, _ = canonical_state_dict(checkpoint_shapes(checkpoint))
    batchnorm = any(k.startswith("bn.") for k in found)
    expected = meta_shapes(lambda: CancerFoundationModel(max(vocab.values()) + 1, vocab["<pad>"], args, batchnorm))
    require_match(checkpoint, expected, found)
    return str(checkpoint)


ENCODER_CHECKS = {
    "uni2h": check_timm,
    "h0mini": check_timm,
    "deepspot_fm": check_timm,
    "sd3_vae": check_sd3_vae,
    "midnight": check_midnight,
    "cancerfoundation": check_cancerfoundation,
}


def check_pretrained_model(model: str, pretrained: dict) -> str:
    """A `pretrained` model folder: stmdit's own (config.json + ema.safetensors) or PixCell's
    diffusers layout (transformer/config.json + diffusion_pytorch_model.safetensors)."""
    from stmdit.model.dit import CONFIG_NAME, EMA_WEIGHTS_FILE, DiTConfig, STMDiT

    path = Path(pretrained["path"]).expanduser()
    if not path.is_dir():
        raise InputError(path, "pretrained model folder not found")
    if pretrained.get("format", "stmdit") == "pixcell":
        from stmdit.model.pixcell import PIXCELL_WEIGHTS_FILE, convert_shapes, dit_config, transformer_folder

        folder = transformer_folder(path)
        if not (folder / "config.json").is_file():
            raise InputError(folder / "config.json", "missing: PixCell's diffusers transformer needs its config.json")
        config = dit_config(read_json(folder / "config.json"), folder / "config.json")
        weights_file = folder / PIXCELL_WEIGHTS_FILE
        if not weights_file.is_file():
            raise InputError(weights_file, "missing: PixCell's transformer weights")
        found = convert_shapes(checkpoint_shapes(weights_file))
        require_match(weights_file, meta_shapes(lambda: STMDiT(config)), found)
        return str(weights_file)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise InputError(config_path, "missing: a pretrained stmdit model folder needs its config.json")
    values = {k: v for k, v in read_json(config_path).items() if k not in ("_class_name", "provenance")}
    try:
        config = DiTConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise InputError(config_path, f"invalid model config: {exc}") from None
    weights_file = path / EMA_WEIGHTS_FILE
    if not weights_file.is_file():
        raise InputError(weights_file, f"missing: a pretrained stmdit model folder needs {EMA_WEIGHTS_FILE}")
    require_match(weights_file, meta_shapes(lambda: STMDiT(config)), checkpoint_shapes(weights_file))
    return str(weights_file)


def pretrained_entry(value: Any) -> dict | None:
    """A model entry's `pretrained` as {format, path} (a bare string is an stmdit folder)."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"format": "stmdit", "path": value}
    return {"format": value.get("format", "stmdit"), "path": value.get("path")}


def check_config(config: dict) -> list[Check]:
    """One Check per real encoder and pretrained model of a validated configuration."""
    features = config["features"]
    allow_hub = bool(features.get("allow_hub"))
    checks = []
    for name, entry in features["encoders"].items():
        if entry.get("impl") != "real":
            continue
        weights = str(entry.get("weights") or "-")
        try:
            where = ENCODER_CHECKS[name](name, entry, allow_hub)
            checks.append(Check(name, weights if where == "hub" else where, "hub" if where == "hub" else "ok"))
        except InputError as err:
            checks.append(Check(name, weights, "FAIL", str(err)))
    for model, entry in config.get("models", {}).items():
        pretrained = pretrained_entry(entry.get("pretrained"))
        if pretrained is None:
            continue
        if not pretrained.get("path"):
            checks.append(Check(f"model {model}", "-", "skip", "no path given: the row is left out"))
            continue
        try:
            checks.append(Check(f"model {model}", check_pretrained_model(model, pretrained), "ok"))
        except InputError as err:
            checks.append(Check(f"model {model}", pretrained["path"], "FAIL", str(err)))
    return checks


def format_table(checks: list[Check]) -> str:
    header = ("encoder", "weights", "status", "problem")
    rows = [header] + [(c.name, c.weights, c.status, c.problem) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + ("  " + r[3] if r[3] else "") for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def deep_merge(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_layered_config(paths: list[Path]) -> dict:
    """Config files layered in order (later keys win, as Snakemake merges --configfile files), validated."""
    import yaml

    from stmdit.config import validate_config

    merged: dict = {}
    for path in paths:
        try:
            merged = deep_merge(merged, yaml.safe_load(Path(path).read_text()) or {})
        except OSError as exc:
            raise InputError(path, f"cannot read config: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise InputError(path, f"not valid YAML: {exc}") from None
    return validate_config(merged, " + ".join(map(str, paths)))


def run(args: argparse.Namespace) -> None:
    config = load_layered_config(args.configfile)
    if args.allow_hub:
        config["features"]["allow_hub"] = True
    checks = check_config(config)
    print(format_table(checks) if checks else "preflight: no real encoder or pretrained model to check")
    failed = [c for c in checks if c.failed]
    if failed:
        raise InputError(None, f"{len(failed)} of {len(checks)} weight checks failed (first: {failed[0].name})")


def register(subparsers) -> None:
    parser = subparsers.add_parser("preflight", help="check every real encoder's and pretrained model's weights",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("configfile", nargs="+", type=Path,
                        help="config files, layered in order (e.g. config.yaml workflow/paper/config.yaml)")
    parser.add_argument("--allow-hub", action="store_true", help="accept hub ids (features.allow_hub)")
    parser.set_defaults(func=run)

