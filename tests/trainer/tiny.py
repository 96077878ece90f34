"""The tiny Llama-style model the trainer tests run (the demo configs' model, tokenizer
vocabulary 512), as a config section."""

TINY_MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 176,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}
