"""Everything is in pyproject.toml, except one build step: a wheel carries the default model.

`weights/llama-tiny/` stays where the repository (and its tests and tools) keep it; building a
wheel copies its files into the package as `minillm/data/llama-tiny/`, so that `minillm generate`
works after a plain `pip install .` (minillm.data.default_model finds either)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
               "tokenizer_config.json")  # as minillm/data/__init__.py (not imported: torch)


class BuildWithModel(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads weights/ in place
            return
        target = Path(self.build_lib) / "minillm" / "data" / "llama-tiny"
        self.mkpath(str(target))
        for name in MODEL_FILES:
            self.copy_file(str(ROOT / "weights" / "llama-tiny" / name), str(target / name))


setup(cmdclass={"build_py": BuildWithModel})
