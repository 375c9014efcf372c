"""Stage-2 samples: an image plus a LLaVA-format conversation, as token ids, labels and the image's offset.

A conversation is rendered with the tokenizer's own chat template (`apply_chat_template`: LLaMA-3-Instruct's,
Qwen2.5's or Qwen3's ChatML, Mistral's [INST] format), with an optional system prompt. The image goes where `<image>`
stands, or at the start of the first user turn when no turn has it: a placeholder string is put there, and the
rendering is tokenized up to it and on from it, so that the resampler's tokens are inserted before text token
`image_offset`. The placeholder itself gives no token, so no family's vocabulary needs one.

Message contents, from data or typed by a user, are text: a special-token string inside one ("<|eot_id|>",
"<|im_start|>assistant", "[INST]") is tokenized as ordinary text and can neither end a turn nor open one. Only the
template's own text (BOS, headers, the token that closes a turn) gives control tokens. To tell them apart, the
template is also rendered with every content replaced by a sentinel, which shows where each content sits in the
rendering. A content that holds special-token text is tokenized on its own with `split_special_tokens`; the rest of
the rendering is tokenized in one go, so an ordinary conversation's tokens are those of the whole rendering (with
SentencePiece tokenizers too, whose pieces would change if tokenized apart).

Labels come from character offsets, not from tokenizing turns one by one: each assistant turn's span is its content
as the template writes it plus the text the template closes the turn with when it is the last one rendered
(LLaMA-3's `<|eot_id|>`, ChatML's `<|im_end|>` and newline, Mistral's `</s>`). Every token of the whole rendering that
overlaps such a span is supervised; nothing else is (BOS, headers, user and system turns, the image, Qwen3's empty
think block). The tokens are those of the whole rendering, as the model sees it, and the template's own
transformations (LLaMA-3 trims each message, Qwen3 writes the last answer after an empty think block and earlier ones
without) are accounted for. Generation prompts end where the supervised answer begins (`CHAT_TEMPLATE_OPTIONS`).

Truncation drops text from the end so that image tokens plus text fit `max_sequence_tokens`; it never cuts the
image. A sample left without a supervised token is skipped and counted (`no_supervised_tokens`), and so is one the
template refuses or rewrites (`bad_conversation`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from jinja2.exceptions import TemplateError

from pipeline.common.labels import IGNORE_INDEX
from pipeline.data.captions import IMAGE_MEMBERS, MAX_IMAGE_PIXELS, ImageDecoder
from pipeline.data.skips import SkipSample, describe_error

IMAGE_TAG = "<image>"
# Marks the image's place in a message: the rendering is tokenized up to it and on from it, and the image goes
# between. It is never tokenized, so no vocabulary needs it. Text rarely holds it (it is a LLaMA-3 reserved token's
# name), and where a message does, `IMAGE_SLOT` tells the image's occurrence from the typed ones.
IMAGE_PLACEHOLDER = "<|reserved_special_token_0|>"
# Passed to every chat template (a template ignores what it does not read). Qwen3's hybrid models think before
# answering unless told not to: generation prompts end with its empty think block ("<think>\n\n</think>\n\n"),
# the answer follows, and training matches that (see `assistant_spans`), since the data has no reasoning to teach.
CHAT_TEMPLATE_OPTIONS = {"enable_thinking": False}
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
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **CHAT_TEMPLATE_OPTIONS
        )
    except TemplateError as error:  # the template's raise_exception: roles out of order, say
        raise ConversationError(f"the chat template refused the conversation: {error}") from None


def assistant_spans(tokenizer, messages: list[dict], text: str, pieces: list[tuple[str, int | None]]):
    """Character spans of the assistant turns in `text`, the full rendering made of `pieces` (see `_pieces`): each
    turn's content as the template writes it, and the text the template closes the turn with (<|eot_id|>,
    <|im_end|> and its newline, </s>), which is what the template writes after the content when the turn is the last
    one rendered. Text the template puts before the content (headers, Qwen3's empty think block) is not supervised:
    generation prompts hold it."""
    starts, position = {}, 0
    for piece, index in pieces:
        if index is not None:
            starts[index] = (position, position + len(piece))
        position += len(piece)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # A property of the template, not of one sample: stop rather than skip every sample.
        if index not in starts:
            raise RuntimeError("the tokenizer's chat template leaves an assistant turn out of the conversation")
        sentinel = f"\ue000{index}\ue001"
        last = _render(tokenizer, _with_sentinels(messages[: index + 1]))
        closing = last[last.index(sentinel) + len(sentinel) :] if sentinel in last else None
        begin, end = starts[index]
        if not closing or not text.startswith(closing, end):
            raise RuntimeError(
                "the tokenizer's chat template closes an assistant turn differently when later turns follow; "
                "stage 2 needs a template that ends every assistant turn the same way"
            )
        spans.append((begin, end + len(closing)))
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
            # Found with this sample's contents (Qwen3 moves an answer's "<think>...</think>" out of its content):
            # the sample's problem, skipped and counted.
            raise ConversationError("the chat template renders a message depending on its own or others' contents")
        pieces += [(skeleton[position:at], None), (rendered[len(before) : len(rendered) - len(after)], index)]
        position = at + length
    pieces.append((skeleton[position:], None))
    text = "".join(piece for piece, _ in pieces)
    if text != _render(tokenizer, messages, generation_prompt):
        raise ConversationError("the chat template renders message contents depending on each other")
    return text, pieces


@functools.lru_cache(maxsize=8)
def _added_token_strings(tokenizer) -> tuple[str, ...]:
    """The strings the tokenizer turns into added tokens wherever they stand in text (special or not)."""
    return tuple(token.content for token in tokenizer.added_tokens_decoder.values())


def _tokenize(tokenizer, messages: list[dict], generation_prompt: bool = False):
    """The rendering of `messages` (without the image placeholder), its token ids, each token's (start, end)
    characters in the rendering, the image's token offset, and the rendering's pieces (see `_pieces`).

    Message contents are tokenized as text: one that holds an added token's string (a special token written in it)
    is tokenized on its own with `split_special_tokens`. Everything else, the template's own text with its special
    tokens and ordinary contents, is tokenized in one run from the image to the next such content, as the model
    reads whole renderings; so BPE and SentencePiece tokenizers alike give the rendering's own tokens. The image
    placeholder that `chat_messages` put in one message marks where the image goes and gives no token: it needs no
    place in the vocabulary.
    """
    text, pieces = _pieces(tokenizer, messages, generation_prompt)
    added = _added_token_strings(tokenizer)
    runs: list[tuple[int, str, bool]] = []  # (start in the rendering, text, tokenized as plain text?)
    image_at = None
    start = 0
    for piece, index in pieces:
        slot = None if index is None else messages[index].get(IMAGE_SLOT)
        split = [(start, piece)]
        if slot is not None:
            at = -1
            for _ in range(slot + 1):
                at = piece.find(IMAGE_PLACEHOLDER, at + 1)
            if at < 0:
                raise ConversationError(f"the chat template dropped the image placeholder of message {index}")
            image_at = start + at
            split = [(start, piece[:at]), (start + at + len(IMAGE_PLACEHOLDER), piece[at + len(IMAGE_PLACEHOLDER) :])]
        for run_start, run in split:
            special_text = index is not None and any(token in run for token in added)
            runs.append((run_start, run, special_text))
        start += len(piece)
    if image_at is None:
        raise ConversationError("no message holds the image placeholder")
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    image_offset = None
    for chunk_start, chunk, as_text in _chunks(runs, image_at):
        if chunk_start >= image_at and image_offset is None:  # the first chunk after the image
            image_offset = len(ids)
        if chunk:
            encoded = tokenizer(
                chunk, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=as_text
            )
            ids += encoded["input_ids"]
            offsets += [(chunk_start + begin, chunk_start + end) for begin, end in encoded["offset_mapping"]]
    if image_offset is None:
        image_offset = len(ids)
    rendering = text[:image_at] + text[image_at + len(IMAGE_PLACEHOLDER) :]
    return rendering, text, ids, offsets, image_offset, pieces


def _chunks(runs: list[tuple[int, str, bool]], image_at: int):
    """Adjacent runs joined into the text pieces tokenized in one call: a content with special-token text stands
    alone (tokenized as plain text), and the image placeholder divides."""
    chunk_start, chunk = None, ""
    for run_start, run, as_text in runs:
        boundary = run_start == image_at + len(IMAGE_PLACEHOLDER)
        if (as_text or boundary) and chunk_start is not None:
            yield chunk_start, chunk, False
            chunk_start, chunk = None, ""
        if as_text:
            yield run_start, run, True
            continue
        if chunk_start is None:
            chunk_start = run_start
        chunk += run
    if chunk_start is not None:
        yield chunk_start, chunk, False


def encode_conversation(
    tokenizer, messages: list[dict], image_tokens: int, max_sequence_tokens: int
) -> EncodedConversation:
    """Token ids, labels and image offset of `messages` (from `chat_messages`), cut to fit the budget.

    Raises `NothingToLearn` when nothing supervised is left after truncation.
    """
    _, text, ids, offsets, image_offset, pieces = _tokenize(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text, pieces)
    labels = [
        token if any(end > span_start and start < span_end for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, offsets, strict=True)
    ]
    budget = max_sequence_tokens - image_tokens
    if image_offset > budget:
        raise NothingToLearn(f"the image comes after {image_offset} tokens; only {budget} fit before it")
    ids, labels = ids[:budget], labels[:budget]
    if all(label == IGNORE_INDEX for label in labels):
        raise NothingToLearn(f"no assistant token is left within {budget} text tokens")
    return EncodedConversation(ids, labels, image_offset)


def encode_prompt(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """Token ids of `messages` followed by the generation prompt (what generation continues), and the image offset."""
    _, _, ids, _, image_offset, _ = _tokenize(tokenizer, messages, generation_prompt=True)
    return ids, image_offset


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
