"""Token counts of a job: what the engine reports, or what the node counts itself.

A receipt bills these counts, and every DATA frame shows the running count a client
pays for if the stream breaks (docs/protocol.md, "Response frames").
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Tally", "choices_per_prompt", "texts_of", "usage_of"]


@dataclass
class Tally:
    """Token counts of one job, from the engine's usage or counted by the node.

    ``prompt`` and ``completion`` are the job's counts so far, and its final counts
    (the receipt's) once the stream ended. With continuous usage, vLLM reports usage
    per choice on each chunk that carries one choice: that choice's completion tokens
    so far and the tokens of its prompt (for completions with several prompts, choice
    ``i`` answers prompt ``i // n``). The tally keeps the most each choice and each
    prompt reported and sums them, so that the count only grows with ``n > 1`` or
    several prompts; vLLM's last chunk (``choices: []``) carries the totals, which
    replace the sums.
    """

    prompt: int = 0
    completion: int = 0
    engine_usage: bool = False  # the last chunk seen carried usage
    chunks_with_text: int = 0
    per_choice: dict[int, int] = field(default_factory=dict)  # completion tokens
    per_prompt: dict[int, int] = field(default_factory=dict)  # prompt tokens

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion}

    def add_engine_usage(self, chunk: dict, usage: tuple[int, int], n: int) -> None:
        """Count the usage the engine sent with ``chunk`` (of a request for ``n``)."""
        prompt, completion = usage
        choices = chunk.get("choices")
        if not choices:  # the final usage chunk: the engine's totals for the job
            self.prompt, self.completion = prompt, completion
            return
        index = choices[0].get("index", 0) if isinstance(choices[0], dict) else None
        if len(choices) != 1 or type(index) is not int or index < 0:
            # Not vLLM's one choice per chunk: read it as a running total.
            self.prompt = max(self.prompt, prompt)
            self.completion = max(self.completion, completion)
            return
        self.per_choice[index] = max(self.per_choice.get(index, 0), completion)
        self.per_prompt[index // n] = max(self.per_prompt.get(index // n, 0), prompt)
        self.prompt = max(self.prompt, sum(self.per_prompt.values()))
        self.completion = max(self.completion, sum(self.per_choice.values()))


def texts_of(obj: dict, texts: dict[int, list[str]]) -> bool:
    """Collect generated text per choice from a chunk or response; True if any."""
    found = False
    for choice in obj.get("choices") or ():
        index = choice.get("index", 0)
        part = choice.get("text")
        if part is None:
            message = choice.get("delta") or choice.get("message") or {}
            part = message.get("content")
            reasoning = message.get("reasoning_content")
            if reasoning:
                texts.setdefault(index, []).append(reasoning)
                found = True
        if part:
            texts.setdefault(index, []).append(part)
            found = True
    return found


def choices_per_prompt(body: dict) -> int:
    """The request's ``n`` (choices per prompt), 1 when absent or not a count."""
    n = body.get("n")
    return n if type(n) is int and n >= 1 else 1


def usage_of(obj: dict) -> tuple[int, int] | None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    try:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
    except (TypeError, ValueError):
        return None
    return prompt, completion
