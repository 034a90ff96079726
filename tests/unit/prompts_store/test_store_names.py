"""Task names: hostile input is refused with a clear message and never reaches the filesystem."""

from __future__ import annotations

import pytest

from prompts_store import InvalidTaskName, StoreError, validate_task_name

# (name, a fragment the message must contain)
HOSTILE = [
    ("", "it is empty"),
    ("../etc/passwd", "path separator"),
    ("..", "starts with '.'"),
    (".", "starts with '.'"),
    ("a/../../b", "path separator"),
    ("/etc/passwd", "path separator"),
    ("/", "path separator"),
    ("C:\\Windows\\system32", "path separator"),
    ("..\\..\\x", "path separator"),
    ("a\x00b", "NUL"),
    ("\x00", "NUL"),
    ("cats\x00.json", "NUL"),
    ("a" * 65, "65 characters long"),
    ("x" * 10_000, "10000 characters long"),
    ("c\u0430ts", "U+0430 CYRILLIC SMALL LETTER A"),  # Cyrillic 'а' looks like 'a'
    ("\uff43\uff41\uff54", "U+FF43 FULLWIDTH LATIN SMALL LETTER C"),
    ("cat\u200b", "U+200B ZERO WIDTH SPACE"),
    ("\u0441at", "U+0441 CYRILLIC SMALL LETTER ES"),
    ("t\u00e2che", "U+00E2 LATIN SMALL LETTER A WITH CIRCUMFLEX"),
    ("ca\u0301t", "U+0301 COMBINING ACUTE ACCENT"),
    ("\u2024\u2024", "U+2024 ONE DOT LEADER"),  # looks like '..'
    ("\u2215etc", "U+2215 DIVISION SLASH"),  # looks like '/'
    ("Cats", "(use lowercase)"),
    ("cat dog", "' '"),
    (" cat", "' '"),
    ("cat\n", "'\\n'"),
    ("cat\t", "'\\t'"),
    ("cat:1", "':'"),
    ("~root", "'~'"),
    ("$HOME", "'$'"),
    ("-rf", "starts with '-'"),
    (".hidden", "starts with '.'"),
    ("_private", "starts with '_'"),
]


@pytest.mark.parametrize(("name", "fragment"), HOSTILE, ids=[ascii(n[:20]) for n, _ in HOSTILE])
def test_hostile_names_are_refused_with_a_clear_message(name, fragment):
    with pytest.raises(InvalidTaskName) as info:
        validate_task_name(name)
    message = str(info.value)
    assert fragment in message
    assert "[a-z0-9._-]" in message  # the rule is always stated
    assert message.isascii() and len(message) < 400  # safe to log, whatever came in
    assert isinstance(info.value, ValueError) and isinstance(info.value, StoreError)


@pytest.mark.parametrize("name", [None, 3, b"cats", ["cats"]], ids=repr)
def test_non_strings_are_refused(name):
    with pytest.raises(InvalidTaskName, match="task name must be a string"):
        validate_task_name(name)


@pytest.mark.parametrize("name", ["a", "0", "cifar10", "eurosat.v2", "my_task-1", "9x", "a" * 64,
                                  "a..b", "a-"])
def test_valid_names_pass_unchanged(name):
    assert validate_task_name(name) == name
    assert type(validate_task_name(name)) is str


def test_str_subclass_comes_back_as_plain_str():
    class Sneaky(str):
        def __str__(self):
            return "../evil"

    assert type(validate_task_name(Sneaky("cats"))) is str
    assert validate_task_name(Sneaky("cats")) == "cats"


@pytest.mark.parametrize(("name", "fragment"), HOSTILE[:12], ids=[ascii(n[:20]) for n, _ in HOSTILE[:12]])
def test_every_store_entry_point_refuses_hostile_names_before_touching_storage(env, make_artifact,
                                                                              name, fragment):
    store = env.store
    artifact = make_artifact()
    artifact.name = name
    calls = [lambda: store.publish(artifact), lambda: store.get(name), lambda: store.history(name),
             lambda: store.delete(name), lambda: store.rollback(name, 1)]
    for call in calls:
        with pytest.raises(InvalidTaskName, match="invalid task name"):
            call()
    assert not env.exists("tasks") and not env.exists("head.json")
    assert store.generation() == 0
