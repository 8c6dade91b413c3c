"""Files shipped with the package: the default model and a public-domain sample text.

The default model is the repository's `weights/llama-tiny/`. An installed wheel carries a copy in
`minillm/data/llama-tiny/` (setup.py copies it at build time); a clone or an editable install
reads `weights/llama-tiny/` itself. `sample.txt` is the opening of Mary Shelley's Frankenstein
(public domain; see README.md here), read by `minillm ppl` and `minillm attn` without `--text`.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE_TEXT = HERE / "sample.txt"
# Files of weights/llama-tiny/ a wheel carries (what load and load_tokenizer read).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
               "tokenizer_config.json")


def default_model() -> Path:
    """The default checkpoint directory: the wheel's copy, else the clone's weights/llama-tiny."""
    shipped = HERE / "llama-tiny"
    if shipped.is_dir():
        return shipped
    return HERE.parents[1] / "weights" / "llama-tiny"
