"""
Configuration of a nanorun GPT exported for Hugging Face transformers (`nanorun export --format hf`).

The fields are nanorun's (nanochat's GPT-2 names: n_layer, n_head, n_kv_head, n_embd) plus the constants the
architecture fixes; the usual transformers names (hidden_size, num_hidden_layers, ...) are aliases of them.
"""

from transformers import PretrainedConfig


class NanorunConfig(PretrainedConfig):
    model_type = "nanorun"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, vocab_size=32768, padded_vocab_size=None, sequence_len=2048, n_layer=12, n_head=6,
                 n_kv_head=6, n_embd=768, window_pattern="SSSL", rope_theta=100_000.0, qk_scale=1.2, softcap=15.0,
                 ve_gate_channels=12, smear_channels=24, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                 tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        # embedding and lm_head rows, rounded up to a multiple of 64; logits are cut back to vocab_size
        self.padded_vocab_size = padded_vocab_size or -(-vocab_size // 64) * 64
        self.sequence_len = sequence_len     # training context; "L" layers attend this far back
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern  # S = a quarter of sequence_len (rounded up to 128), L = all of it
        self.rope_theta = rope_theta
        self.qk_scale = qk_scale
        self.softcap = softcap
        self.ve_gate_channels = ve_gate_channels
        self.smear_channels = smear_channels
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
