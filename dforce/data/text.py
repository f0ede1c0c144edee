"""Text as a backbone reads it: per-token embeddings with their attention mask (`Text`), the null text
of classifier-free guidance, and a `transformers` text encoder that makes them from prompts.

A clip's text is `encoder_hidden_states` [L, D], zero after its tokens, and `encoder_attention_mask` [L],
True for a real token, padded to a fixed length L (Wan's pipeline pads UMT5's output the same way). The
null text is no tokens at all: zero embeddings, mask all False. It is defined here once, and the loss
(dropping text), the guided denoiser and self-forcing's teacher all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dforce import DforceError

STATES, MASK = "encoder_hidden_states", "encoder_attention_mask"  # the backbone's keywords, batch keys
TEXT_KEYS = (STATES, MASK)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


@dataclass(frozen=True)
class Text:
    """The text of a batch of clips: states [B, L, D] (zero where there is no token), mask [B, L] bool."""

    states: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.states.ndim != 3 or self.mask.shape != self.states.shape[:2]:
            raise ValueError(
                f"text must be {STATES} [B, L, D] with {MASK} [B, L], got {list(self.states.shape)} "
                f"and {list(self.mask.shape)}"
            )

    @classmethod
    def of(cls, batch: dict) -> Text | None:
        """The batch's text, None if it carries none."""
        return cls(batch[STATES], batch[MASK].bool()) if STATES in batch else None

    def kwargs(self) -> dict[str, Tensor]:
        """The backbone's keyword arguments."""
        return {STATES: self.states, MASK: self.mask}

    def dropped(self, drop: Tensor) -> Text:
        """The null text (no tokens) for the clips where `drop` [B] is True, the text elsewhere."""
        keep = ~drop.to(self.mask.device, torch.bool)  # [B]
        return Text(torch.where(keep[:, None, None], self.states, 0), self.mask & keep[:, None])

    def null(self) -> Text:
        """The null text of every clip: the unconditional branch of text guidance."""
        return self.dropped(torch.ones(len(self.mask), dtype=torch.bool))

    def unconditional(self, negative: Text | None = None) -> Text:
        """The unconditional branch of text guidance for every clip: the null text, or a negative prompt
        (one prompt [1, L', D], as `dforce encode-text --prompt` writes it) cut or padded to this text's
        length L."""
        if negative is None:
            return self.null()
        batch, length = self.mask.shape
        if negative.states.shape[0] != 1 or negative.states.shape[2] != self.states.shape[2]:
            raise ValueError(
                f"a negative prompt must be [1, L, {self.states.shape[2]}], got {list(negative.states.shape)}"
            )
        states, mask = negative.states[:, :length], negative.mask[:, :length]
        pad = length - states.shape[1]
        states = torch.nn.functional.pad(states, (0, 0, 0, pad)).to(self.states)
        mask = torch.nn.functional.pad(mask, (0, pad)).to(self.mask)
        return Text(states.expand(batch, -1, -1), mask.expand(batch, -1))

    def to(self, device: torch.device | str) -> Text:
        return Text(self.states.to(device), self.mask.to(device))

    @staticmethod
    def cat(texts: Sequence[Text]) -> Text:
        """The texts one after the other along the batch."""
        return Text(torch.cat([t.states for t in texts]), torch.cat([t.mask for t in texts]))

    def save(self, path: str | Path) -> None:
        """A safetensors file of the two tensors, for `dforce sample --prompt-embeds`."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({STATES: self.states.contiguous().cpu(), MASK: self.mask.contiguous().cpu()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> Text:
        """A file that `save` wrote; ValueError naming the file and the key it lacks."""
        try:
            tensors = load_file(str(path))
        except (OSError, ValueError) as error:  # safetensors raises its own error, a ValueError
            raise ValueError(f"{path}: not a safetensors file of prompt embeddings ({error})") from None
        missing = [key for key in TEXT_KEYS if key not in tensors]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} among {sorted(tensors)}")
        return cls(tensors[STATES], tensors[MASK].bool())


def pad_tokens(tokens: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """One clip's token embeddings [n, D] -> (states [length, D], zero after them; mask [length] bool)."""
    count = len(tokens)
    if count > length:
        raise ValueError(f"{count} text tokens do not fit in a text length of {length}")
    states = tokens.new_zeros(length, tokens.shape[1])
    states[:count] = tokens
    return states, torch.arange(length) < count


class TextEncoderNotFound(DforceError, FileNotFoundError):
    """A folder that holds no text encoder or no tokenizer."""


def encoder_folders(path: str | Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) of a text encoder folder or a diffusers pipeline root (whose
    `text_encoder/` and `tokenizer/` Wan's layout has); the tokenizer is looked for in the encoder's folder,
    its `tokenizer` subfolder, then its sibling `tokenizer`."""
    path = Path(path)
    encoder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
    if not (encoder / "config.json").is_file():
        raise TextEncoderNotFound(
            f"{path}: no config.json nor text_encoder/config.json: pass a transformers text encoder folder "
            "or a diffusers pipeline root"
        )
    for folder in encoder, encoder / "tokenizer", encoder.parent / "tokenizer":
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return encoder, folder
    raise TextEncoderNotFound(
        f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)}) in {encoder}, {encoder / 'tokenizer'} "
        f"or {encoder.parent / 'tokenizer'}"
    )


class TextEncoder:
    """A `transformers` text encoder (T5, UMT5, mT5: `AutoModelForTextEncoding`) and its tokenizer,
    loaded from a local folder (`encoder_folders`): prompts -> per-token embeddings."""

    def __init__(
        self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from transformers import AutoModelForTextEncoding, AutoTokenizer  # slow to import: only when used

        encoder, tokenizer = encoder_folders(path)
        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.encoder = AutoModelForTextEncoding.from_pretrained(encoder, dtype=dtype).to(device).eval()
        self.dim: int = self.encoder.config.d_model

    @torch.no_grad()
    def tokens(self, prompts: Sequence[str], length: int) -> list[Tensor]:
        """Each prompt's token embeddings [n, D], n <= `length` (longer prompts are cut, as Wan's are)."""
        batch = self.tokenizer(
            list(prompts), padding="longest", max_length=length, truncation=True, return_tensors="pt"
        )
        device = self.encoder.device
        mask = batch.attention_mask.to(device)  # [B, n]
        states = self.encoder(input_ids=batch.input_ids.to(device), attention_mask=mask).last_hidden_state
        return [row[: int(count)] for row, count in zip(states, mask.sum(1), strict=True)]

    def __call__(self, prompts: Sequence[str], length: int) -> Text:
        """The prompts' text padded to `length`: states [B, length, D] float32, mask [B, length]."""
        padded = [pad_tokens(tokens.float().cpu(), length) for tokens in self.tokens(prompts, length)]
        return Text(torch.stack([s for s, _ in padded]), torch.stack([m for _, m in padded]))
