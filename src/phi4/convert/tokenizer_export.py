"""The Phi-4 tokenizer as Hugging Face tokenizer files, built offline from the bundled ranks.

transformers' TikTokenConverter recovers the BPE merges from the cl100k_base ranks; the split
pattern is cl100k's classic one (docs/model.md, "Split pattern": with tiktoken's newer possessive
pattern the Hugging Face tokenizer disagreed with tiktoken on some strings). The Phi-4 special
tokens keep their ids, and the chat template renders the Phi-4 chat format (docs/model.md,
"Chat format").
"""

from __future__ import annotations

import json
from pathlib import Path

from phi4.data.tokenizer import FIRST_SPECIAL, Phi4Tokenizer, get_tokenizer

CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)


def build_hf_tokenizer(model_max_length: int):
    """A transformers fast tokenizer equal to phi4.data.tokenizer on ordinary text and specials."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = get_tokenizer()
    ranks = {tok.token_bytes(i): i for i in range(FIRST_SPECIAL)}

    class _BundledRanks(TikTokenConverter):
        def load_tiktoken_bpe(self, _):  # the ranks come from bpe-openai, not a download
            return ranks

    specials = tok.specials  # in id order, so each lands on its own id after the 100256 ranks
    backend = _BundledRanks(pattern=CL100K_PATTERN, extra_special_tokens=list(specials)).converted()
    for token, expected in specials.items():
        got = backend.token_to_id(token)
        if got != expected:
            raise RuntimeError(f"tokenizer export: {token} got id {got}, expected {expected}")
    special = {v: k for k, v in specials.items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special[Phi4Tokenizer.bos_id],
        eos_token=special[Phi4Tokenizer.eos_id],
        pad_token=special[Phi4Tokenizer.pad_id],
        unk_token=special[Phi4Tokenizer.eod_id],
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def write_tokenizer(directory: Path, model_max_length: int) -> None:
    build_hf_tokenizer(model_max_length).save_pretrained(str(directory))
    # transformers 5 keeps the template in chat_template.jinja; older readers (and vLLM with
    # them) look in tokenizer_config.json, as microsoft/phi-4 ships it.
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
