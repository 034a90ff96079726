"""The open vocabulary that answers images no learned task claims, in task-agnostic mode (the frozen CLIP's answer).

    name, words = load_vocabulary("imagenet-1k")     # open_clip's ImageNet-1k class names, shipped with open_clip
    name, words = load_vocabulary("/etc/keepclip/words.txt")   # one name per line, or a JSON list of strings
    load_vocabulary("none")                           # no vocabulary: such images get empty scores

Without it, an image that matches no task would get no answer at all; the product's promise is the frozen CLIP
answer for those images, and a classifier needs class names.
"""
from __future__ import annotations

import json
from pathlib import Path

BUILT_IN = ("imagenet-1k", "none")
MAX_WORDS = 100_000
MAX_WORD_CHARS = 200


class VocabularyError(ValueError):
    """A vocabulary setting that names no built-in list and no readable file of names."""


def load_vocabulary(spec: str) -> tuple[str, list[str]]:
    """(a short name for responses and logs, the class names) for the `vocabulary` setting."""
    if spec == "none":
        return "none", []
    if spec == "imagenet-1k":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return spec, list(IMAGENET_CLASSNAMES)
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise VocabularyError(f"vocabulary {spec!r}: not one of {', '.join(BUILT_IN)} and not a readable UTF-8 file ({e})") from None
    words = _parse(text, spec)
    return path.name, words


def _parse(text: str, spec: str) -> list[str]:
    if text.lstrip().startswith("["):
        try:
            words = json.loads(text)
        except json.JSONDecodeError as e:
            raise VocabularyError(f"vocabulary {spec}: not valid JSON ({e})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise VocabularyError(f"vocabulary {spec}: a JSON vocabulary must be a list of strings")
    else:
        words = text.splitlines()
    words = list(dict.fromkeys(w.strip() for w in words if w.strip()))
    if not words or len(words) > MAX_WORDS or any(len(w) > MAX_WORD_CHARS for w in words):
        raise VocabularyError(f"vocabulary {spec}: needs 1 to {MAX_WORDS} distinct names of at most {MAX_WORD_CHARS} characters")
    return words
