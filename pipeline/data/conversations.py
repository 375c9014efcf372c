"""Stage-2 samples: an image plus a LLaVA-format conversation, as token ids, labels and the image's offset.

A conversation is rendered with the tokenizer's own chat template (`apply_chat_template`, LLaMA-3-Instruct's for the
real model), with an optional system prompt. The image goes where `<image>` stands, or at the start of the first
user turn when no turn has it: a placeholder special token is put there, the rendered text is tokenized, and the
placeholder's token is taken out again, leaving its index as `image_offset` (the resampler's tokens are inserted
before text token `image_offset`).

Message contents, from data or typed by a user, are text: a special-token string inside one ("<|eot_id|>",
"<|start_header_id|>assistant") is tokenized as ordinary text and can neither end a turn nor open one. Only the
template's own text (BOS, headers, the `<|eot_id|>` that closes a turn) and the image placeholder give control
tokens. To tell them apart, the template is also rendered with every content replaced by a sentinel, which shows
where each content sits in the rendering; contents are then tokenized with `split_special_tokens`, the template's
pieces without it. LLaMA-3's template trims each content and puts it between "\n\n" and a special token, where its
pre-tokenizer splits anyway, so the tokens equal those of tokenizing the whole rendering at once whenever no
content holds special-token text.

Labels come from character offsets, not from tokenizing turns one by one: the character span of each assistant
turn (its content and the `<|eot_id|>` the template closes it with) is where rendering the conversation up to the
turn with a generation prompt ends and rendering it up to and including the turn ends. Every token of the whole
rendering that overlaps such a span is supervised; nothing else is (BOS, headers, user and system turns, the
image). The tokens are those of the whole rendering, as the model sees it, and the template's own transformations
(LLaMA-3 trims each message) are accounted for.

Truncation drops text from the end so that image tokens plus text fit `max_sequence_tokens`; it never cuts the
image. A sample left without a supervised token is skipped and counted (`no_supervised_tokens`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from pipeline.common.labels import IGNORE_INDEX
from pipeline.data.captions import IMAGE_MEMBERS, MAX_IMAGE_PIXELS, ImageDecoder
from pipeline.data.skips import SkipSample, describe_error

IMAGE_TAG = "<image>"
# A special token of LLaMA-3's vocabulary (and of the toy tokenizer's) that no text uses: where it lands after
# tokenization is where the image goes. It never reaches the model.
IMAGE_PLACEHOLDER = "<|reserved_special_token_0|>"
# The key of the message that holds the image: how many literal placeholder strings (text) precede the image's.
IMAGE_SLOT = "image_slot"
CONVERSATION_MEMBER = "json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ConversationError(ValueError):
    """A conversation that cannot be used as it is (bad roles, no turns); the message says why."""


class NothingToLearn(ConversationError):
    """No assistant token is left once the conversation is cut to the sequence budget."""


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except on assistant tokens (and their <|eot_id|>)
    image_offset: int  # the image's tokens go before input_ids[image_offset]


def chat_messages(turns: list[dict], system_prompt: str = "") -> list[dict]:
    """LLaVA turns ({"from": "human" | "gpt", "value": ...}) as chat messages with the image placeholder.

    The first `<image>` of any turn becomes the placeholder; further ones are dropped. Without one, the
    placeholder starts the first user turn, followed by a newline as in LLaVA's data.
    """
    if not turns:
        raise ConversationError("no turns")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    placed = False
    for turn in turns:
        role = ROLES.get(turn.get("from", turn.get("role")))
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            raise ConversationError(f"turn {turn!r:.80} has no known role (human/gpt) or no text")
        before, *after = content.split(IMAGE_TAG)
        message = {"role": role, "content": "".join([before, *after])}
        if after and not placed:
            # The placeholder string is also ordinary text that a message may hold; the image is the one that
            # follows those already in `before`.
            message |= {
                "content": before + IMAGE_PLACEHOLDER + "".join(after),
                IMAGE_SLOT: before.count(IMAGE_PLACEHOLDER),
            }
            placed = True
        messages.append(message)
    first_user = next((m for m in messages if m["role"] != "system"), None)
    if first_user is None or first_user["role"] != "user":
        raise ConversationError("the conversation must start with a human turn")
    if not placed:
        first_user |= {"content": f"{IMAGE_PLACEHOLDER}\n{first_user['content']}", IMAGE_SLOT: 0}
    return messages


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns (content and closing tokens) in `text`, the full rendering."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:index], generation_prompt=True))
        end = len(_render(tokenizer, messages[: index + 1]))
        if not text.startswith(_render(tokenizer, messages[: index + 1])) or start > end:
            # A property of the tokenizer, not of one sample: stop rather than skip every sample.
            raise RuntimeError(
                "the tokenizer's chat template does not render a conversation's turns as prefixes of "
                "it; stage 2 needs a template like LLaMA-3-Instruct's"
            )
        spans.append((start, end))
    return spans


def _with_sentinels(messages: list[dict], keep: int | None = None) -> list[dict]:
    """`messages` with every content but message `keep`'s replaced by a sentinel that names the message."""
    # Private-use characters: not whitespace (a trimming template keeps them), and no template adds them.
    return [m if index == keep else m | {"content": f"\ue000{index}\ue001"} for index, m in enumerate(messages)]


def _pieces(tokenizer, messages: list[dict], generation_prompt: bool) -> tuple[str, list[tuple[str, int | None]]]:
    """The rendering of `messages` and the pieces that make it up, in order: (text, index of the message whose
    content it is, or None for the template's own text). A content is as the template writes it (LLaMA-3 trims it)."""
    skeleton = _render(tokenizer, _with_sentinels(messages), generation_prompt)
    located = []
    for index in range(len(messages)):
        sentinel = f"\ue000{index}\ue001"
        if skeleton.count(sentinel) > 1:
            raise RuntimeError("the tokenizer's chat template writes a message's content more than once")
        if sentinel in skeleton:
            located.append((skeleton.index(sentinel), len(sentinel), index))
    pieces: list[tuple[str, int | None]] = []
    position = 0
    for at, length, index in sorted(located):
        # This message's content as the template writes it: rendered among the other messages' sentinels, it is
        # what stands between the skeleton's text before and after its own sentinel.
        rendered = _render(tokenizer, _with_sentinels(messages, keep=index), generation_prompt)
        before, after = skeleton[:at], skeleton[at + length :]
        if len(rendered) < len(before) + len(after) or not (rendered.startswith(before) and rendered.endswith(after)):
            raise RuntimeError("the tokenizer's chat template renders a message depending on the others' contents")
        pieces += [(skeleton[position:at], None), (rendered[len(before) : len(rendered) - len(after)], index)]
        position = at + length
    pieces.append((skeleton[position:], None))
    text = "".join(piece for piece, _ in pieces)
    if text != _render(tokenizer, messages, generation_prompt):
        raise RuntimeError("the tokenizer's chat template renders message contents depending on each other")
    return text, pieces


def _tokenize(tokenizer, messages: list[dict], generation_prompt: bool = False):
    """The rendering of `messages`, its token ids, and each token's (start, end) characters in the rendering.

    Message contents are tokenized as text (special-token strings in them become ordinary tokens), except the image
    placeholder that `chat_messages` put in one of them; the template's own text keeps its special tokens.
    """
    text, pieces = _pieces(tokenizer, messages, generation_prompt)
    runs: list[tuple[int, str, bool]] = []  # (start in the rendering, text, tokenized as plain text?)
    start = 0
    for piece, index in pieces:
        slot = None if index is None else messages[index].get(IMAGE_SLOT)
        if slot is None:
            runs.append((start, piece, index is not None))
        else:
            at = -1
            for _ in range(slot + 1):
                at = piece.find(IMAGE_PLACEHOLDER, at + 1)
            if at < 0:
                raise ConversationError(f"the chat template dropped the image placeholder of message {index}")
            end = at + len(IMAGE_PLACEHOLDER)
            runs += [
                (start, piece[:at], True),
                (start + at, IMAGE_PLACEHOLDER, False),
                (start + end, piece[end:], True),
            ]
        start += len(piece)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for run_start, run, as_text in runs:
        if run:
            encoded = tokenizer(
                run, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text
            )
            ids += encoded["input_ids"]
            offsets += [(run_start + begin, run_start + end) for begin, end in encoded["offset_mapping"]]
    return text, ids, offsets


def _take_placeholder(tokenizer, ids: list[int], *others: list) -> int:
    placeholder = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    positions = [i for i, token in enumerate(ids) if token == placeholder]
    if len(positions) != 1:
        raise ConversationError(f"the text holds {IMAGE_PLACEHOLDER} {len(positions)} times; it must hold it once")
    for sequence in (ids, *others):
        del sequence[positions[0]]
    return positions[0]


def encode_conversation(
    tokenizer, messages: list[dict], image_tokens: int, max_sequence_tokens: int
) -> EncodedConversation:
    """Token ids, labels and image offset of `messages` (from `chat_messages`), cut to fit the budget.

    Raises `NothingToLearn` when nothing supervised is left after truncation.
    """
    text, ids, offsets = _tokenize(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    labels = [
        token if any(end > span_start and start < span_end for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, offsets, strict=True)
    ]
    image_offset = _take_placeholder(tokenizer, ids, labels)
    budget = max_sequence_tokens - image_tokens
    if image_offset > budget:
        raise NothingToLearn(f"the image comes after {image_offset} tokens; only {budget} fit before it")
    ids, labels = ids[:budget], labels[:budget]
    if all(label == IGNORE_INDEX for label in labels):
        raise NothingToLearn(f"no assistant token is left within {budget} text tokens")
    return EncodedConversation(ids, labels, image_offset)


def encode_prompt(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """Token ids of `messages` followed by the assistant header (what generation continues), and the image offset."""
    _, ids, _ = _tokenize(tokenizer, messages, generation_prompt=True)
    return ids, _take_placeholder(tokenizer, ids)


class ConversationDecoder:
    """A record of an image and a `KEY.json` holding {"conversations": [...]} (LLaVA's format) ->
    {"key", "pixel_values", "text_ids", "text_labels", "image_offset"}.

    Picklable and cheap to pickle: the tokenizer and image processor load lazily, once per process.
    """

    def __init__(
        self,
        image_processor_path: str,
        tokenizer_path: str,
        image_tokens: int,
        max_sequence_tokens: int,
        system_prompt: str = "",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        self.images = ImageDecoder(image_processor_path, max_image_pixels)
        self.tokenizer_path = tokenizer_path
        self.image_tokens, self.max_sequence_tokens = image_tokens, max_sequence_tokens
        self.system_prompt = system_prompt
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            if tokenizer.chat_template is None:
                raise ValueError(
                    f"tokenizer '{self.tokenizer_path}' has no chat template; stage 2 needs an "
                    "instruction-tuned model's tokenizer (e.g. Meta-Llama-3-8B-Instruct)"
                )
            if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
                raise ValueError(f"tokenizer '{self.tokenizer_path}' lacks {IMAGE_PLACEHOLDER}, the image placeholder")
            self._tokenizer = tokenizer
        return self._tokenizer

    def load(self) -> None:
        _ = self.tokenizer
        self.images.load()

    def __call__(self, sample: dict[str, bytes], key: str) -> dict:
        image_member = next((name for name in IMAGE_MEMBERS if name in sample), None)
        if image_member is None or CONVERSATION_MEMBER not in sample:
            raise SkipSample("missing_member", f"members {sorted(sample)}")
        tokenizer = self.tokenizer  # outside the try: a wrong tokenizer is the run's error, not the sample's
        try:
            record = json.loads(sample[CONVERSATION_MEMBER])
            messages = chat_messages(record["conversations"], self.system_prompt)
            encoded = encode_conversation(tokenizer, messages, self.image_tokens, self.max_sequence_tokens)
        except NothingToLearn as error:
            raise SkipSample("no_supervised_tokens", str(error)) from None
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # ConversationError and broken JSON
            raise SkipSample("bad_conversation", describe_error(error)) from None
        return {
            "key": key,
            **self.images(sample[image_member]),
            "text_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "text_labels": torch.tensor(encoded.labels, dtype=torch.long),
            "image_offset": encoded.image_offset,
        }


def collate_conversations(samples: list[dict]) -> dict:
    """Stack the images and concatenate the texts: {"keys", "pixel_values": [B, 3, S, S], "text_ids",
    "text_labels": LongTensor[sum of lengths], "text_lengths", "image_offsets": LongTensor[B]}."""
    return {
        "keys": [sample["key"] for sample in samples],
        "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),
        "text_ids": torch.cat([sample["text_ids"] for sample in samples]),
        "text_labels": torch.cat([sample["text_labels"] for sample in samples]),
        "text_lengths": torch.tensor([len(sample["text_ids"]) for sample in samples], dtype=torch.long),
        "image_offsets": torch.tensor([sample["image_offset"] for sample in samples], dtype=torch.long),
    }
