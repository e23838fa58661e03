"""Source-format adapters: one pure function per dataset schema, into TRL's conversational formats.

SFT rows become prompt/completion examples and preference rows prompt/chosen/rejected examples:

    {"id", "category", "prompt": [messages], "completion": [assistant message], "n_chars"}
    {"id", "category", "prompt": [messages], "chosen": [...], "rejected": [...], "n_chars"}

`n_chars` is the length the `data.max_chars` filter applies to: the characters of the source's own text fields
(for Dolly instruction + context + response), so the filter means what the seed recipes mean by it. A row that
cannot be used raises InvalidRow with a reason from REASONS; prepare counts those instead of crashing. A row whose
category is missing, null, blank or not a string is kept as DEFAULT_CATEGORY, and its example carries RELABELLED
(the reason, from RELABEL_REASONS) for prepare to count and remove.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_FIELD = "empty_field"
MALFORMED = "malformed"
REASONS = (MISSING_FIELD, WRONG_TYPE, EMPTY_FIELD, MALFORMED)

DEFAULT_CATEGORY = "general"
# Kept rows whose category was replaced by DEFAULT_CATEGORY: the example's RELABELLED key names why.
RELABELLED = "relabelled"
CATEGORY_MISSING = "category_missing"  # no category field, null, or blank
CATEGORY_WRONG_TYPE = "category_wrong_type"  # a number, list, ... instead of a string
RELABEL_REASONS = (CATEGORY_MISSING, CATEGORY_WRONG_TYPE)
ROLES = ("system", "user", "assistant")

Example = dict[str, Any]


class InvalidRow(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _text(row: Mapping, key: str, *, required: bool = True) -> str:
    """The string field `key`; a missing optional field reads as ""."""
    if key not in row or row[key] is None:
        if required:
            raise InvalidRow(MISSING_FIELD, f"no '{key}' field")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise InvalidRow(WRONG_TYPE, f"'{key}' is {type(value).__name__}, expected str")
    if required and not value.strip():
        raise InvalidRow(EMPTY_FIELD, f"'{key}' is empty")
    return value


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content.strip()}


def _category(row: Mapping, key: str = "category") -> dict[str, str]:
    """{"category": the row's category}, or DEFAULT_CATEGORY with RELABELLED saying why the row's could not be used."""
    value = row.get(key)
    if isinstance(value, str) and value.strip():
        return {"category": value.strip()}
    reason = CATEGORY_MISSING if value is None or isinstance(value, str) else CATEGORY_WRONG_TYPE
    return {"category": DEFAULT_CATEGORY, RELABELLED: reason}


def content_id(*parts: Any) -> str:
    """A stable id for rows that carry none: the hash of their content, so it survives reordering."""
    payload = json.dumps(parts, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _row_id(row: Mapping, *keys: str) -> str | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return None


def _sft_example(row: Mapping, messages: list[dict[str, str]], n_chars: int, category: dict[str, str]) -> Example:
    prompt, completion = messages[:-1], messages[-1:]
    return {
        "id": _row_id(row, "id") or content_id(prompt, completion),
        **category,
        "prompt": prompt,
        "completion": completion,
        "n_chars": n_chars,
    }


def _user_turn(instruction: str, extra: str) -> str:
    """An instruction with its context or input folded into the same user turn."""
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()


def from_dolly(row: Mapping) -> Example:
    """databricks-dolly-15k: instruction, context, response, category."""
    instruction, response = _text(row, "instruction"), _text(row, "response")
    context = _text(row, "context", required=False)
    messages = [_message("user", _user_turn(instruction, context)), _message("assistant", response)]
    return _sft_example(row, messages, len(instruction) + len(context) + len(response), _category(row))


def from_alpaca(row: Mapping) -> Example:
    """tatsu-lab/alpaca and Alpaca-GPT4: instruction, input, output."""
    instruction, output = _text(row, "instruction"), _text(row, "output")
    extra = _text(row, "input", required=False)
    messages = [_message("user", _user_turn(instruction, extra)), _message("assistant", output)]
    return _sft_example(row, messages, len(instruction) + len(extra) + len(output), _category(row))


_INST_TURN = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=\[INST\]|\Z)", re.DOTALL)
_SYS_BLOCK = re.compile(r"<<SYS>>(.*?)<</SYS>>", re.DOTALL)


def _checked_turns(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Reject conversations that do not alternate user/assistant (after an optional system turn) or end on a user."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns or turns[-1]["role"] != "assistant":
        raise InvalidRow(MALFORMED, "the conversation does not end with an assistant turn")
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise InvalidRow(MALFORMED, f"turn {index + 1} is '{message['role']}', expected '{expected}'")
        if not message["content"]:
            raise InvalidRow(EMPTY_FIELD, f"turn {index + 1} ({message['role']}) is empty")
    return messages


def parse_inst_text(text: str) -> list[dict[str, str]]:
    """Turns of a Mistral-Instruct string `<s>[INST] question [/INST] answer </s>[INST] ...`."""
    body = text.replace("<s>", "").replace("</s>", "")
    messages: list[dict[str, str]] = []
    for question, answer in _INST_TURN.findall(body):
        system = _SYS_BLOCK.search(question)
        if system and not messages:
            messages.append(_message("system", system.group(1)))
            question = _SYS_BLOCK.sub("", question)
        messages += [_message("user", question), _message("assistant", answer)]
    if not messages:
        raise InvalidRow(MALFORMED, "no [INST] ... [/INST] turn found")
    return _checked_turns(messages)


def from_text(row: Mapping) -> Example:
    """Seed 004's custom JSON: {"text": "<s>[INST] question [/INST] answer </s>"}."""
    messages = parse_inst_text(_text(row, "text"))
    n_chars = sum(len(m["content"]) for m in messages if m["role"] != "system")
    return _sft_example(row, messages, n_chars, _category(row))


def _chat(value: Any, key: str) -> list[dict[str, str]]:
    """A list of {role, content} dicts, checked for types and known roles."""
    if not isinstance(value, list):
        raise InvalidRow(WRONG_TYPE, f"'{key}' is {type(value).__name__}, expected a list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise InvalidRow(WRONG_TYPE, f"'{key}'[{index}] is not a {{role, content}} message")
        if message.get("role") not in ROLES:
            raise InvalidRow(MALFORMED, f"'{key}'[{index}] has role {message.get('role')!r}")
        messages.append(_message(message["role"], message["content"]))
    return messages


def _field(row: Mapping, key: str) -> Any:
    if key not in row or row[key] is None:
        raise InvalidRow(MISSING_FIELD, f"no '{key}' field")
    return row[key]


def from_messages(row: Mapping) -> Example:
    """A chat per row: {"messages": [{"role": ..., "content": ...}, ...]}; the last assistant turn is the target."""
    messages = _checked_turns(_chat(_field(row, "messages"), "messages"))
    n_chars = sum(len(m["content"]) for m in messages if m["role"] != "system")
    return _sft_example(row, messages, n_chars, _category(row))


def from_lima(row: Mapping) -> Example:
    """GAIR/lima: {"conversations": [user, assistant, user, ...], "source": ...}, turns as plain strings."""
    turns = _field(row, "conversations")
    if not isinstance(turns, list) or not all(isinstance(turn, str) for turn in turns):
        raise InvalidRow(WRONG_TYPE, "'conversations' must be a list of strings")
    messages = [_message("user" if i % 2 == 0 else "assistant", turn) for i, turn in enumerate(turns)]
    messages = _checked_turns(messages)
    return _sft_example(row, messages, sum(len(t) for t in turns), _category(row, "source"))


def _preference_example(row: Mapping, prompt: list, chosen: list, rejected: list, n_chars: int) -> Example:
    if chosen == rejected:
        raise InvalidRow(MALFORMED, "chosen and rejected are identical")
    example: Example = {
        "id": _row_id(row, "prompt_id", "id") or content_id(prompt, chosen, rejected),
        **_category(row),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "n_chars": n_chars,
    }
    for key in ("score_chosen", "score_rejected"):
        if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool):
            example[key] = float(row[key])
    return example


def _split_answer(conversation: list[dict[str, str]], key: str) -> tuple[list, list]:
    """(prompt turns, [final assistant turn]) of a full conversation."""
    if not conversation or conversation[-1]["role"] != "assistant":
        raise InvalidRow(MALFORMED, f"'{key}' does not end with an assistant turn")
    if not conversation[-1]["content"]:
        raise InvalidRow(EMPTY_FIELD, f"the assistant turn of '{key}' is empty")
    return conversation[:-1], conversation[-1:]


def from_ultrafeedback(row: Mapping) -> Example:
    """HuggingFaceH4/ultrafeedback_binarized: prompt, chosen/rejected conversations, score_chosen/score_rejected."""
    prompt_text = _text(row, "prompt")
    chosen_prompt, chosen = _split_answer(_chat(_field(row, "chosen"), "chosen"), "chosen")
    rejected_prompt, rejected = _split_answer(_chat(_field(row, "rejected"), "rejected"), "rejected")
    if chosen_prompt != rejected_prompt:
        raise InvalidRow(MALFORMED, "chosen and rejected answer different conversations")
    prompt = _checked_turns(chosen_prompt + chosen)[:-1] if chosen_prompt else [_message("user", prompt_text)]
    n_chars = sum(len(m["content"]) for m in prompt) + max(len(chosen[0]["content"]), len(rejected[0]["content"]))
    return _preference_example(row, prompt, chosen, rejected, n_chars)


def from_pairs(row: Mapping) -> Example:
    """TRL's standard preference format with plain strings: {"prompt", "chosen", "rejected"}."""
    prompt, chosen, rejected = (_text(row, key) for key in ("prompt", "chosen", "rejected"))
    n_chars = len(prompt) + max(len(chosen), len(rejected))
    return _preference_example(
        row,
        [_message("user", prompt)],
        [_message("assistant", chosen)],
        [_message("assistant", rejected)],
        n_chars,
    )


SFT_FORMATS: dict[str, Callable[[Mapping], Example]] = {
    "dolly": from_dolly,
    "alpaca": from_alpaca,
    "text": from_text,
    "messages": from_messages,
    "lima": from_lima,
}
PREFERENCE_FORMATS: dict[str, Callable[[Mapping], Example]] = {
    "ultrafeedback": from_ultrafeedback,
    "pairs": from_pairs,
}


def with_system_prompt(example: Example, system_prompt: str | None) -> Example:
    """The example with a fixed system turn first (seed 003), unless it already has one."""
    if not system_prompt or example["prompt"][:1] and example["prompt"][0]["role"] == "system":
        return example
    return {**example, "prompt": [_message("system", system_prompt), *example["prompt"]]}
