"""The four model families: config parsing and checkpoint name maps, as data.

Each family module is thin. It provides:
- `MODEL_TYPES`: the `model_type` values it reads;
- `parse(reader) -> ModelConfig` and `to_hf(config) -> dict` (the reverse, for saving);
- `weight_map(config)`: our parameter name -> the checkpoint's name (or a tuple of names that are
  concatenated along dim 0, such as Llama's q/k/v into one fused projection). `{i}` is the layer;
- `IGNORED`: regexes of checkpoint tensors that are deliberately not used (rotary caches, masks).
The blocks themselves live in `minillm/model.py`, shared by every family.
"""

from __future__ import annotations

from types import ModuleType

from . import falcon, gpt_neox, llama, mpt

FAMILIES: dict[str, ModuleType] = {
    "llama": llama,
    "falcon": falcon,
    "mpt": mpt,
    "gpt_neox": gpt_neox,
}


def family_for_model_type(model_type: str) -> ModuleType | None:
    for module in FAMILIES.values():
        if model_type in module.MODEL_TYPES:
            return module
    return None
