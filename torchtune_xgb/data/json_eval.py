"""Exact-match evaluation on the user's own file: ``eval.examples`` from a local JSON / JSON-lines file.

    eval:
      examples:
        _component_: torchtune_xgb.data.json_eval_examples
        path: /path/to/my_eval.jsonl
        # either chat records (default): {"messages": [{"role": ..., "content": ...}, ...]}
        #   every message before the last is the prompt; the last (an assistant turn) is the answer
        # or columns:  input_column: question   output_column: answer   (system_prompt: optional)
      normalize: strip          # none | strip | lower | number  (how replies and answers compare)

The file is opened read-only and never written (the arithmetic generator writes only into its
own files, see arithmetic.py). Format: a JSON array of records, or one JSON object per line.
A missing file, a record without the configured column(s) or a chat record that does not end
with an assistant turn fails with one line naming the key and the record.
"""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchtune_xgb.errors import ConfigError

KEY = "eval.examples"


def _records(path: Path) -> List[Any]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as err:
            line = err.lineno + text[: len(text) - len(stripped)].count("\n")
            raise ConfigError(f"{KEY}.path: {path} is not JSON ({err.msg}, line {line})") from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):  # JSON lines: say which line of the file
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{KEY}.path: {path} is not JSON lines ({err.msg}, line {number})") from err
    return records


def json_eval_examples(
    path: str,
    input_column: Optional[str] = None,
    output_column: Optional[str] = None,
    messages_column: str = "messages",
    system_prompt: Optional[str] = None,
    max_examples: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Read evaluation prompts with reference answers from a local file (never written).

    Args:
        path: a ``.json`` (array of objects) or ``.jsonl`` (one object per line) file.
        input_column, output_column: column mode: the user turn and the reference answer (both
            or neither). Without them, chat mode: ``messages_column`` holds OpenAI-style
            ``{"role", "content"}`` messages whose last one, an assistant turn, is the answer.
        messages_column: the chat column (default ``messages``).
        system_prompt: column mode only: a system turn put before every user turn.
        max_examples: keep only the first N records.

    Returns:
        ``[{"prompt_messages": [{"role", "content"}, ...], "answer": str}, ...]``, the format
        ``torchtune_xgb.eval.exact_match.exact_match`` takes.
    """
    if (input_column is None) != (output_column is None):
        missing = "output_column" if output_column is None else "input_column"
        raise ConfigError(f"{KEY}.{missing}: input_column and output_column go together")
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise ConfigError(f"{KEY}.max_examples: must be an integer ≥ 1, got {max_examples!r}")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"{KEY}.path: file not found: {file}")
    records = _records(file)
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{KEY}.path: {file} holds no records")
    if max_examples is not None:
        records = records[:max_examples]
    examples = []
    for i, row in enumerate(records, 1):
        where = f"record {i} of {file}"
        if not isinstance(row, dict):
            raise ConfigError(f"{KEY}.path: {where} is not a JSON object")
        if input_column is not None:
            for key, column in (("input_column", input_column), ("output_column", output_column)):
                if column not in row:
                    raise ConfigError(f"{KEY}.{key}: column {column!r} missing in {where} (has: {', '.join(sorted(row))})")
            prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": str(row[input_column])}
            ]
            examples.append({"prompt_messages": prompt, "answer": str(row[output_column])})
            continue
        messages = row.get(messages_column)
        if not isinstance(messages, list) or not messages:
            raise ConfigError(
                f"{KEY}.messages_column: column {messages_column!r} missing or empty in {where} "
                f"(for input/output records set input_column and output_column)"
            )
        if any(not isinstance(m, dict) or "role" not in m or "content" not in m for m in messages):
            raise ConfigError(f"{KEY}.messages_column: {where}: every message needs 'role' and 'content'")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ConfigError(f"{KEY}.messages_column: {where} does not end with an assistant message after a prompt")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        examples.append({"prompt_messages": prompt, "answer": str(messages[-1]["content"])})
    return examples
