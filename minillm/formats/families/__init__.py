"""The four model families, and the one dispatch from a `config.json` to a ModelConfig.

Each family module is thin. It provides, as data:
- `MODEL_TYPES`: the `model_type` values it reads;
- `PARSED`, `REFUSED`, `NEUTRAL`: the config keys it reads, the ones it refuses unless they hold
  their default, and the family-specific keys that cannot change the forward pass (the policy is
  described in `minillm/formats/config.py`);
- `parse(reader) -> ModelConfig` and `to_hf(config) -> dict` (the reverse, for saving);
- `weight_map(config)`: our parameter name -> the checkpoint's name (or a tuple of names that are
  concatenated along dim 0, such as Llama's q/k/v into one fused projection). `{i}` is the layer;
- `IGNORED`: regexes of checkpoint tensors that are deliberately not used (rotary caches, masks).
The blocks themselves live in the engine (`minillm/model.py`), shared by every family. The families
import `minillm.formats.config`; nothing there imports them, so there is no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ...errors import MiniLLMError
from ...core.config import ModelConfig
from ..config import ConfigReader
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


def from_hf_config(data: dict, where: str = "config.json", *, strict: bool = False) -> ModelConfig:
    """Parse a `config.json` dict, dispatching on `model_type`.

    Unknown keys give one ConfigWarning naming them (an error with `strict=True`); keys that would
    change the forward pass and are not implemented are refused by name either way."""
    if not isinstance(data, dict):
        raise MiniLLMError(f"{where}: expected a JSON object")
    model_type = data.get("model_type")
    if model_type is None:
        raise MiniLLMError(f"{where}: missing 'model_type'")
    family = family_for_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise MiniLLMError(f"{where}: unknown model_type {model_type!r} (supported: "
                           f"{', '.join(sorted(FAMILIES))}, RefinedWeb, RefinedWebModel)")
    reader = ConfigReader(data, model_type, where, keys=family.PARSED | family.REFUSED,
                          neutral=family.NEUTRAL, strict=strict)
    reader.check_refused()
    config = family.parse(reader)
    reader.finish()
    return config


def to_hf_config(config: ModelConfig) -> dict:
    """The `config.json` dict a family's own code (and transformers) would read."""
    return FAMILIES[config.family].to_hf(config)


def load_config(directory: str | Path, *, strict: bool = False) -> ModelConfig:
    from ...checks import check_path
    from ..reading import is_present, read_json

    path = Path(check_path("load_config: directory", directory)) / "config.json"
    if not is_present(path):
        raise MiniLLMError(f"config.json not found in {directory}")
    data = read_json(path, what="config.json", expect_object=False)
    return from_hf_config(data, where=str(path), strict=strict)
