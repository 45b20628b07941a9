"""The CLIP vision tower of a checkpoint: where its directory is, what its configuration is, its processor.

The attention-head count is not in the weights, so it is never guessed: it comes from the tower's
own config.json, or from the published configuration of the OpenAI CLIP the checkpoint names.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from egpt_speed.errors import EgptError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=512)
_VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
# The published configs of the OpenAI CLIP towers, by the directory name `mm_visual_tower` uses.
KNOWN_CLIP_TOWERS: dict[str, dict] = {
    "clip-vit-large-patch14-336": dict(_VIT_L, patch_size=14, image_size=336),
    "clip-vit-large-patch14": dict(_VIT_L, patch_size=14, image_size=224),
    "clip-vit-base-patch16": dict(_VIT_B, patch_size=16, image_size=224),
    "clip-vit-base-patch32": dict(_VIT_B, patch_size=32, image_size=224),
}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size")


def check_vision_tower_override(override: Path | None) -> None:
    """`--vision-tower` must name an existing CLIP model directory (checked before any model loads)."""
    if override is None:
        return
    if not override.exists():
        raise EgptError(f"--vision-tower {override} does not exist; pass the directory of the CLIP ViT the checkpoint was trained with.")
    if not (override / "config.json").exists():
        raise EgptError(f"--vision-tower {override} is not a CLIP model directory (no config.json).")


def locate_vision_tower(value: str, checkpoint: Path, override: Path | None) -> Path | None:
    """Resolve ``mm_visual_tower``: --vision-tower, as given, beside/in the checkpoint, ./checkpoints/; None if absent."""
    check_vision_tower_override(override)
    if override is not None:
        return override
    for candidate in tower_candidates(value, checkpoint):
        if (candidate / "config.json").exists():
            return candidate
    return None


def tower_candidates(value: str, checkpoint: Path) -> list[Path]:
    name = Path(value).name
    candidates = [Path(value), checkpoint / value, checkpoint.parent / value, checkpoint / name,
                  checkpoint.parent / name, Path("checkpoints") / value, Path("checkpoints") / name]
    return list(dict.fromkeys(candidates))


def find_vision_tower(value: str, checkpoint: Path, override: Path | None) -> Path:
    """The tower directory, which must exist when the checkpoint does not embed the tower's weights."""
    found = locate_vision_tower(value, checkpoint, override)
    if found is None:
        looked = ", ".join(str(c) for c in tower_candidates(value, checkpoint))
        raise EgptError(f"vision tower {value!r} not found (looked in {looked}); pass --vision-tower PATH to a local CLIP ViT dir.")
    return found


def clip_config_from_dir(tower_dir: Path):
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_pretrained(str(tower_dir))
    except Exception as error:  # transformers raises OSError/ValueError for broken configs
        raise EgptError(f"could not read the CLIP config in {tower_dir} ({type(error).__name__}: {error}).") from None


def tower_shape(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """The sizes a CLIP vision state dict (keys without `vision_model.`) does determine: all but the head count."""
    patch = weights["embeddings.patch_embedding.weight"]  # [hidden, 3, p, p]
    positions = weights["embeddings.position_embedding.weight"].shape[0]
    grid = int(round((positions - 1) ** 0.5))
    return {"hidden_size": patch.shape[0], "patch_size": patch.shape[-1], "image_size": grid * patch.shape[-1],
            "num_hidden_layers": len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")}),
            "intermediate_size": weights["encoder.layers.0.mlp.fc1.weight"].shape[0]}


def embedded_tower_config(value: str, weights: dict[str, torch.Tensor], tower_dir: Path | None):
    """The config of a tower whose weights are in the checkpoint: its dir's config.json, else the named OpenAI CLIP's."""
    from transformers import CLIPVisionConfig

    if tower_dir is not None:
        return clip_config_from_dir(tower_dir)
    name = Path(value).name
    known = KNOWN_CLIP_TOWERS.get(name)
    if known is None:
        raise EgptError(f"the checkpoint embeds the CLIP tower {value!r} but no config.json for it was found and its "
                        f"attention-head count is not in the weights; pass --vision-tower PATH to its CLIP dir.")
    shape = tower_shape(weights)
    differing = [f"{k} {shape[k]} (the {name} config says {known[k]})" for k in SHAPE_KEYS if shape[k] != known[k]]
    if differing:
        raise EgptError(f"the checkpoint's embedded CLIP tower is not {name}: {', '.join(differing)}; "
                        f"pass --vision-tower PATH to the CLIP dir it was trained with.")
    return CLIPVisionConfig(**known)


def make_image_processor(image_size: int, tower_dir: Path | None = None):
    """The CLIP processor: shortest edge → S, centre crop S×S, rescale, CLIP mean/std."""
    import transformers

    # Without torchvision transformers falls back to the PIL processor anyway, but warns on stderr each run.
    has_torchvision = importlib.util.find_spec("torchvision") is not None
    CLIPImageProcessor = getattr(transformers, "CLIPImageProcessor" if has_torchvision else "CLIPImageProcessorPil")
    if tower_dir is not None and (tower_dir / "preprocessor_config.json").exists():
        return CLIPImageProcessor.from_pretrained(str(tower_dir))
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
