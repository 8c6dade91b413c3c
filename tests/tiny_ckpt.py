"""A tiny checkpoint built by the tests themselves: random Llama weights + a trained byte-level BPE.

`build_tiny_checkpoint(directory)` writes config.json + model.safetensors (minillm.save_pretrained),
tokenizer.json (a ~300-token byte-level BPE, with a BOS post-processor, trained in-process with `tokenizers` on ~30 KB of
seeded pseudo-English), tokenizer_config.json and generation_config.json (BOS <s> = 0, EOS </s> = 1).
The model's vocabulary matches the tokenizer's. The `tiny_checkpoint` fixture builds it once per
test session.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = ("the of and to a in that he was it his is with as for had you not be her on at by which have "
         "or from this him but all she they were my are me one their so an said them we who would been "
         "will no when there if more out up into do any your what has man could other than our some very "
         "time upon about may its only now like little then can should made did us such great before must "
         "two these see know over much down after first good men own never most old shall day where those "
         "came come himself way work life without go make well through being long say might how am too "
         "even def under years think again while here whale ship sea captain heart night house hand").split()


def training_text(n_chars: int = 30_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        s = " ".join(words).capitalize() + rng.choice([".", ".", ",", "?", "!", ";"])
        if rng.random() < 0.05:
            s += " Café naïve — “quoted” 日本."  # multi-byte characters for the byte-level paths
        out.append(s)
        size += len(s) + 1
    return "\n".join(out)


def build_tiny_checkpoint(directory: Path, vocab: int = 300, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    import minillm
    from util import random_model, tiny_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(training_text(seed=seed).split("\n"), trainer)
    # BOS at position 0, said by the file itself (as in weights/): every reader adds it.
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    config = tiny_config("llama_gqa", heads=4, head_dim=8, layers=2, vocab=tk.get_vocab_size(),
                         max_position_embeddings=256)
    minillm.save_pretrained(random_model(config, dtype=torch.float32, seed=seed, std=0.02), directory)
    return directory


_BUILT: dict = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    if "dir" not in _BUILT:
        _BUILT["dir"] = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))
    return _BUILT["dir"]
