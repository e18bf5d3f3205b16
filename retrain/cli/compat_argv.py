"""retrain.py's command-line habits, where they are safe: argv rewritten before absl reads it.

retrain.py read its flags with argparse's `parse_known_args()`: it took an unambiguous prefix of
a flag (`--summaries` for `--summaries_dir`) and ignored what it did not know. absl does
neither, so `rewrite_argv` turns such an argv into one absl reads, and says what it did:

- a prefix of exactly one flag is that flag (a warning names it); of several, an error;
- an unknown flag is dropped with a warning (with the word after it, when that word is no flag),
  unless it is close to one of ours (a typo: an error with the suggestions);
- `--bool_flag False` (a word absl would leave as a stray argument, and argparse silently read
  as "on") is read as `--bool_flag=false`, with a warning; other stray words are dropped with one;
- the Poets retrain.py's `--architecture` and `--model_dir` are taken out and kept
  (`Rewritten.poets`) for `retrain.cli.poets` to map.

Nothing here imports TensorFlow or absl: the function is pure and tested without a run.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field

from retrain.errors import UsageError

# Flags of the Poets retrain.py (TensorFlow's examples/image_retraining, 2017-2018) that
# retrain honours differently; each takes a value.
POETS_FLAGS = ("architecture", "model_dir")
# absl's own flags that every FlagValues reads: passed on as they are.
ABSL_FLAGS = ("flagfile", "undefok")
# Words that, after a boolean flag, say which value the script meant.
BOOL_WORDS = {
    "true": "true",
    "false": "false",
    "1": "true",
    "0": "false",
    "yes": "true",
    "no": "false",
    "t": "true",
    "f": "false",
}
TYPO_CUTOFF = 0.8  # difflib ratio above which an unknown flag reads as a typo of ours


@dataclass
class Rewritten:
    """What `rewrite_argv` made of an argv: the argv absl reads, the warnings to log (one line
    each), the Poets flags given (name -> value) and our flags given (name -> value or None)."""

    argv: list[str]
    warnings: list[str] = field(default_factory=list)
    poets: dict[str, str] = field(default_factory=dict)
    given: dict[str, str | None] = field(default_factory=dict)


def rewrite_argv(argv: list[str], kinds: Mapping[str, bool]) -> Rewritten:
    """argv (program name first) rewritten for absl, given our flags as name -> whether it is
    boolean. Raises UsageError (one line) for an ambiguous prefix or a likely typo."""
    out = Rewritten([argv[0]] if argv else [])
    words = list(argv[1:])
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            out.argv += words[i - 1 :]
            break
        if not word.startswith("-") or word == "-":
            out.warnings.append(f"ignored the stray argument {word!r} (retrain.py ignored it)")
            continue
        name, eq, value = word.lstrip("-").partition("=")
        value = value if eq else None
        full, negated = _resolve(name, kinds, word)
        if full is None:
            i = _drop_unknown(name, value, words, i, kinds, out)
            continue
        if full != name.removeprefix("no" if negated else ""):
            out.warnings.append(f"read --{name} as --{'no' * negated}{full}")
        i = _take(full, negated, value, words, i, kinds, out)
    return out


def _resolve(name: str, kinds: Mapping[str, bool], word: str) -> tuple[str | None, bool]:
    """(the flag `name` stands for, whether it is a --noflag form); (None, False) when it
    stands for none. A prefix of several flags is a UsageError."""
    known = [*kinds, *POETS_FLAGS, *ABSL_FLAGS]
    if name in known:
        return name, False
    bools = [flag for flag, is_bool in kinds.items() if is_bool]
    if name.startswith("no") and name[2:] in bools:
        return name[2:], True
    matches = [flag for flag in known if flag.startswith(name)] if name else []
    negated = [flag for flag in bools if name.startswith("no") and flag.startswith(name[2:])]
    if len(matches) + len(negated) > 1:
        shown = ", ".join(f"--{m}" for m in [*matches, *(f"no{n}" for n in negated)])
        raise UsageError(f"{word.partition('=')[0]} is ambiguous: it could be {shown}")
    if matches:
        return matches[0], False
    if negated:
        return negated[0], True
    return None, False


def _drop_unknown(
    name: str,
    value: str | None,
    words: list[str],
    i: int,
    kinds: Mapping[str, bool],
    out: Rewritten,
) -> int:
    """Warn about an unknown flag and drop it (and the word after it, its value, when that is
    no flag); a likely typo of ours is a UsageError. Returns the index of the next word."""
    close = difflib.get_close_matches(name, list(kinds), n=3, cutoff=TYPO_CUTOFF)
    if close:
        shown = " or ".join(f"--{c}" for c in close)
        raise UsageError(f"unknown flag --{name}: did you mean {shown}?")
    dropped = f"--{name}" + (f"={value}" if value is not None else "")
    if value is None and i < len(words) and not words[i].startswith("-"):
        dropped += f" {words[i]}"
        i += 1
    out.warnings.append(f"ignored the unknown flag {dropped} (retrain.py ignored it)")
    return i


def _take(
    full: str,
    negated: bool,
    value: str | None,
    words: list[str],
    i: int,
    kinds: Mapping[str, bool],
    out: Rewritten,
) -> int:
    """Append flag `full` in absl's `--name=value` form (taking its value from the next word
    when it needs one); keep a Poets flag aside. Returns the index of the next word."""
    if kinds.get(full, False):
        if negated or value is not None:
            suffix = f"={value}" if value is not None else ""
            out.argv.append(f"--{'no' * negated}{full}{suffix}")
            out.given[full] = "false" if negated else value
            return i
        meant = BOOL_WORDS.get(words[i].lower()) if i < len(words) else None
        if meant is not None:
            out.warnings.append(
                f"read --{full} {words[i]} as --{full}={meant} (retrain.py ignored the word "
                f"{words[i]!r} and turned --{full} on)"
            )
            i += 1
        out.argv.append(f"--{full}" + (f"={meant}" if meant else ""))
        out.given[full] = meant or "true"
        return i
    if value is None and i < len(words):
        value, i = words[i], i + 1
    if full in POETS_FLAGS:
        if value is None:
            raise UsageError(f"--{full} needs a value")
        out.poets[full] = value
        return i
    out.argv.append(f"--{full}" + (f"={value}" if value is not None else ""))
    out.given[full] = value
    return i


__all__ = ["POETS_FLAGS", "Rewritten", "rewrite_argv"]
