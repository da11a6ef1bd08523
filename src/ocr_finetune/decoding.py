"""Decoding as the official DeepSeek-OCR inference code does it: the text of the generated ids with special
tokens kept, and its no-repeat guard (n-grams banned within a window of recent tokens, table cells exempt).

Why not transformers' own pieces: `skip_special_tokens=True` drops what this tokenizer marks special, and in
DeepSeek-OCR's tokenizer that includes `<td>`, `</td>`, `<tr>`, `</tr>` and the grounding tags, so HTML
tables would lose every row and cell; transformers' `no_repeat_ngram_size` looks at the whole sequence with
no exemptions, so a table's repeated `</td><td>` runs and any long page would be cut short.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

# the official code exempts the table-cell tags (ids 128821 and 128822 in the real tokenizer) from the guard
EXEMPT_TOKENS = ("<td>", "</td>")


def decode_generated(tokenizer, ids: torch.Tensor) -> tuple[str, bool]:
    """(text, stopped) of one row of generated ids: decoded with special tokens kept, up to the end marker
    (generate() pads finished rows with the pad token after it)."""
    ids = ids.tolist()
    stopped = tokenizer.eos_token_id in ids
    if stopped:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    while ids and ids[-1] == tokenizer.pad_token_id:  # a pad id other than EOS, after a row that never stopped
        ids.pop()
    return tokenizer.decode(ids, skip_special_tokens=False).strip(), stopped


def exempt_ids(tokenizer) -> list[int]:
    """Ids of EXEMPT_TOKENS in this tokenizer, where it has them as single tokens."""
    ids = []
    for token in EXEMPT_TOKENS:
        i = tokenizer.convert_tokens_to_ids(token)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.append(i)
    return ids


class WindowedNoRepeatNGram(LogitsProcessor):
    """The official NoRepeatNGramLogitsProcessor, batched on the device: a token that would complete an
    n-gram already seen among the last `window` generated tokens is banned, except `exempt` ones. Prompt
    tokens (the first `prompt_width` of each row) are not looked at."""

    def __init__(self, ngram_size: int, window: int, prompt_width: int, exempt: list[int] = ()):
        self.n, self.window, self.prompt_width = ngram_size, window, prompt_width
        self.exempt = list(exempt)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width:]
        n = self.n
        tail = generated[:, -self.window:]
        if generated.shape[1] < n or tail.shape[1] < n:
            return scores
        grams = tail.unfold(1, n, 1)  # (batch, grams, n): every n-gram inside the window
        prefix = generated[:, generated.shape[1] - (n - 1):]
        hit = (grams[:, :, :-1] == prefix[:, None, :]).all(-1)
        banned = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        banned.scatter_add_(1, grams[:, :, -1], hit.to(torch.int32))
        if self.exempt:
            banned[:, self.exempt] = 0
        return scores.masked_fill(banned > 0, float("-inf"))
