"""What minillm does with a model: the applications on top of the engine.

    sampling.py        how a stream picks its tokens (sample, Sampler) and the checks on logits
    generation.py      generate: one prompt streaming through a fixed sink+window cache
    batching.py        run_rows, the continuous-batching loop; generate_batch and Request
    chat.py            ChatSession (chat templates as transformers renders them), ChatSessions
    evaluate.py        perplexity in the paper's four modes (public as `minillm.evaluate`)
    attention_maps.py  attention maps and per-layer attention-sink scores (the paper's §2)
    plots.py           every figure (matplotlib, passed in)

Each imports only the ones above it in this list, and the engine never imports any of them.
"""
