"""Import-only stand-in: megatron/tokenizer imports transformers.AutoTokenizer at import time; the NullTokenizer
these runs use never touches it (the real package would pull compiled tokenizers and a hub client)."""


class AutoTokenizer:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise RuntimeError("transformers is an import-only stand-in here")
