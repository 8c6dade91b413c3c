"""What minillm reads and writes: checkpoints, configs, tokenizers and text, in their own formats.

    config.py      the config-key policy (parsed / neutral / refused / warned) and its reader
    families/      llama, falcon, mpt, gpt_neox: config.json <-> ModelConfig, weight-name maps
    checkpoint.py  safetensors -> model through the name maps, strictly, and back
    gguf.py        GGUF -> config, dequantized tensors (the gguf package) and tokenizer
    tokenizer.py   tokenizer.json / tokenizer.model / GGUF vocabularies, as transformers encodes
    hub.py         hub repo ids -> local directories (huggingface_hub)
    text.py        reading UTF-8 text files (Project Gutenberg boilerplate stripped)
    reading.py     opening input files (regular files only, refused by kind before open) and the
                   one JSON parser (nesting depth, huge integers, repeated keys: one-line errors)

The engine never imports this package: it takes a ModelConfig (minillm/core/config.py) and tensors.
"""
