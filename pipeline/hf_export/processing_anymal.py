"""Inputs of an AnyMAL model: images through its image processor, text in the format it was trained on.

`processor(images=..., text=...)` returns `input_ids` (left-padded, for generation), `attention_mask` and
`pixel_values`, one image per text. Where the image goes, the ids hold `num_image_tokens` copies of `image_token_id`,
an id past the LLM's vocabulary that no text tokenizes to, and the model puts the resampler's output there. In a
rendered prompt the image's place is marked by the string `image_token`, which is never tokenized: the text is
tokenized up to it and on from it, so no tokenizer needs an image token in its vocabulary.

- A chat model ("chat"): `text` is a question (a user turn) or a conversation, a list of {"role", "content"}
  messages whose content is a string or a list of parts ({"type": "text", "text": ...}, {"type": "image"}); the
  string "<image>" also marks the image. The image goes where it is marked, else at the start of the first user
  turn followed by a newline. The processor's system prompt comes first unless the conversation has one. The
  conversation is rendered with the tokenizer's chat template and the options the model was trained with
  (`chat_template_options`, such as Qwen3's `enable_thinking=False`), and the assistant header is added. What a
  message says is text: special-token strings in it (such as "<|eot_id|>" or "<|im_end|>") are tokenized as
  ordinary text, and only the template's own text gives control tokens. The rest of the rendering is tokenized in
  one run on each side of the image, as the model was trained (so BPE merges and SentencePiece pieces are those of
  the whole rendering).
- A captioning model ("caption"): BOS (when the LLM has one; Qwen's tokenizers have none, and their captions start
  with the image), the image, then `text` if given, which the caption continues.
- Either: a string that holds `image_token` (such as the output of `apply_chat_template`) is taken as a prompt
  already in the model's format and tokenized as it is, the image where `image_token` stands.
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, ProcessorMixin

IMAGE_TAG = "<image>"
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def _sentinel(index: int) -> str:
    # Private-use characters: no template adds or trims them, so they show where each message's content sits.
    return f"\ue000{index}\ue001"


class AnyMALProcessor(ProcessorMixin):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        task: str = "chat",
        num_image_tokens: int = 64,
        image_token: str = "<|reserved_special_token_0|>",
        image_token_id: int | None = None,
        bos_token_id: int | None = None,
        stop_token_ids: list[int] | None = None,
        chat_template_options: dict | None = None,
        system_prompt: str = "",
    ):
        self.task = task
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.bos_token_id = bos_token_id
        self.stop_token_ids = list(stop_token_ids or ())
        self.chat_template_options = dict(chat_template_options or {})
        self.system_prompt = system_prompt
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        # The model's config names the same id; past the vocabulary by default, so no text can give it.
        self.image_token_id = len(tokenizer) if image_token_id is None else image_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Contents holding one of these strings are tokenized on their own as plain text (see `encode_messages`).
        self._added_strings = tuple(token.content for token in tokenizer.added_tokens_decoder.values())

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs) -> BatchFeature:
        texts = self._as_batch(text)
        image_list = None if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if texts is None:
            if image_list is None:
                raise ValueError("give images, text or both")
            texts = [None] * len(image_list)
        if image_list is not None and len(image_list) != len(texts):
            raise ValueError(f"one image per text: got {len(image_list)} images for {len(texts)} texts")
        rows = [self.encode(item, with_image=image_list is not None) for item in texts]
        features = self.pad(rows)
        if image_list is not None:
            features["pixel_values"] = self.image_processor(images=image_list, return_tensors="pt")["pixel_values"]
        return BatchFeature(features, tensor_type=return_tensors)

    @staticmethod
    def _as_batch(text):
        if text is None:
            return None
        if isinstance(text, str):
            return [text]
        text = list(text)
        if not text or isinstance(text[0], dict):
            return [text]  # one conversation
        return text

    def pad(self, rows: list[list[int]]) -> dict:
        """Left-pad token rows into `input_ids` and `attention_mask` tensors."""
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            if row:
                input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                attention_mask[index, width - len(row) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @property
    def image_ids(self) -> list[int]:
        return [self.image_token_id] * self.num_image_tokens

    def encode(self, text, with_image: bool = True) -> list[int]:
        """The token ids of one sample (`text` as `__call__` takes it), image tokens included."""
        if isinstance(text, str) and self.image_token in text:
            return self._encode_formatted(text, with_image)
        if self.task == "caption":
            if text is not None and not isinstance(text, str):
                raise ValueError("a captioning model takes no conversation: give no text, or the caption's start")
            bos = [] if self.bos_token_id is None else [self.bos_token_id]
            image = self.image_ids if with_image else []
            return [*bos, *image, *self._text_ids(text or "", as_text=True)]
        if text is None:
            raise ValueError("a chat model needs a question or a conversation")
        messages, image_at = self.chat_messages(text, with_image)
        return self.encode_messages(messages, image_at)

    def _encode_formatted(self, text: str, with_image: bool) -> list[int]:
        parts = text.split(self.image_token)
        if len(parts) - 1 != (1 if with_image else 0):
            raise ValueError(
                f"a formatted prompt must hold {self.image_token} once per image; it holds it {len(parts) - 1}x"
            )
        if not with_image:
            return self._text_ids(text, as_text=False)
        return [*self._text_ids(parts[0], as_text=False), *self.image_ids, *self._text_ids(parts[1], as_text=False)]

    def _text_ids(self, text: str, as_text: bool) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]

    def chat_messages(self, conversation, with_image: bool = True) -> tuple[list[dict], tuple[int, int] | None]:
        """Messages for the chat template, and where the image placeholder is: (message index, how many literal
        placeholder strings precede it in that message's content), or None without an image."""
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        messages, image_at = [], None
        for message in conversation:
            role = ROLES.get(message.get("role", message.get("from")))
            content = message.get("content", message.get("value"))
            if role is None:
                raise ValueError(f"unknown role in message {message!r:.80}; use system, user or assistant")
            content = self._content_text(content)
            before, *after = content.split(IMAGE_TAG)
            content = before + "".join(after)
            if after and with_image and image_at is None:
                # A literal placeholder string typed in the message is text; the image is the one after those.
                image_at = (len(messages), before.count(self.image_token))
                content = before + self.image_token + "".join(after)
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "system" for m in messages) and self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
            image_at = None if image_at is None else (image_at[0] + 1, image_at[1])
        first = next((index for index, m in enumerate(messages) if m["role"] != "system"), None)
        if first is None or messages[first]["role"] != "user":
            raise ValueError("the conversation must start with a user turn")
        if with_image and image_at is None:
            messages[first]["content"] = f"{self.image_token}\n{messages[first]['content']}"
            image_at = (first, 0)
        return messages, image_at

    @staticmethod
    def _content_text(content) -> str:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError(f"a message's content is a string or a list of parts, not {type(content).__name__}")
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(("text", part.get("text", "")))
            elif kind in ("image", "image_url"):
                pieces.append(("image", None))
            else:
                raise ValueError(f"unknown content part {part!r:.80}; use text and image parts")
        text = ""
        for index, (kind, value) in enumerate(pieces):
            if kind == "image":
                # An image first is LLaVA's "<image>\n" question layout.
                text += IMAGE_TAG + ("\n" if index == 0 else "")
            else:
                text += ("\n" if index and pieces[index - 1][0] == "text" else "") + value
        return text

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=self.chat_template,
            **self.chat_template_options,
        )

    def _pieces(self, messages: list[dict]) -> list[tuple[str, int | None]]:
        """The rendering with a generation prompt as pieces: (text, index of the message whose content it is, as
        the template writes it, or None for the template's own text)."""
        skeleton = self._render([m | {"content": _sentinel(i)} for i, m in enumerate(messages)], True)
        if any(skeleton.count(_sentinel(i)) > 1 for i in range(len(messages))):
            raise ValueError("the chat template writes a message's content more than once")
        located = sorted((skeleton.index(_sentinel(i)), i) for i in range(len(messages)) if _sentinel(i) in skeleton)
        pieces, position = [], 0
        for at, index in located:
            before, after = skeleton[:at], skeleton[at + len(_sentinel(index)) :]
            alone = [m if i == index else m | {"content": _sentinel(i)} for i, m in enumerate(messages)]
            rendered = self._render(alone, True)
            if len(rendered) < len(before) + len(after) or not (
                rendered.startswith(before) and rendered.endswith(after)
            ):
                raise ValueError("the chat template renders a message depending on the other messages' contents")
            pieces += [(skeleton[position:at], None), (rendered[len(before) : len(rendered) - len(after)], index)]
            position = at + len(_sentinel(index))
        pieces.append((skeleton[position:], None))
        if "".join(text for text, _ in pieces) != self._render(messages, True):
            raise ValueError("the chat template renders message contents depending on each other")
        return pieces

    def encode_messages(self, messages: list[dict], image_at: tuple[int, int] | None) -> list[int]:
        """Token ids of the rendered messages plus the assistant header, the image tokens where the placeholder
        stands. A content that holds an added token's string is tokenized alone as plain text; everything else
        (the template's text with its special tokens, ordinary contents) is tokenized in one run up to the image and
        one after it, as the whole rendering, so the tokens are those the model was trained on."""
        runs: list[tuple[str, bool] | None] = []  # (text, a content holding special-token text?), None: the image
        for text, index in self._pieces(messages):
            parts: list[str | None] = [text]
            if image_at is not None and index == image_at[0]:
                at = -1
                for _ in range(image_at[1] + 1):
                    at = text.find(self.image_token, at + 1)
                if at < 0:
                    raise ValueError("the chat template dropped the image placeholder")
                parts = [text[:at], None, text[at + len(self.image_token) :]]
            for part in parts:
                special = part is not None and index is not None and any(s in part for s in self._added_strings)
                runs.append(None if part is None else (part, special))
        ids: list[int] = []
        plain = ""
        for run in runs:
            if run is not None and not run[1]:
                plain += run[0]
                continue
            ids += self._text_ids(plain, as_text=False)
            plain = ""
            ids += self.image_ids if run is None else self._text_ids(run[0], as_text=True)
        return ids + self._text_ids(plain, as_text=False)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        """The conversation rendered as the model reads it, with `image_token` where the image goes; passing that
        string back as `text` gives the same tokens whenever no message holds special-token text."""
        messages, _ = self.chat_messages(conversation, with_image=kwargs.pop("with_image", True))
        rendered = self._render(messages, add_generation_prompt)
        if tokenize:
            return self(text=rendered, images=kwargs.get("images"), return_tensors=kwargs.get("return_tensors", "pt"))
        return rendered

    def decode_answers(self, sequences, prompt_length: int) -> list[str]:
        """The generated text of each row of `generate`'s output: the tokens after the prompt up to the first of the
        model's terminators, without special tokens, stripped (as the pipeline decodes its answers)."""
        stops = set(self.stop_token_ids)
        answers = []
        for row in sequences[:, prompt_length:].tolist():
            end = next((index for index, token in enumerate(row) if token in stops), len(row))
            answers.append(self.tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        return answers

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["AnyMALProcessor"]
