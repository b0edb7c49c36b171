"""A1111 prompt syntax: emphasis weights and BREAK, [from:to:when] editing, [a|b] alternation, # comments.
Must not import anything outside the Python standard library (no torch, no lark, no regex package)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

# The weight parse_prompt_attention gives the ("BREAK", ...) fragment that closes a 75-token chunk.
# A BREAK inside brackets has this weight multiplied like any other fragment (A1111 does the same),
# so only a fragment whose weight is exactly this value is a chunk break for the encoder.
BREAK_MARKER_WEIGHT = -1.0
ROUND_BRACKET_MULTIPLIER = 1.1
# A1111 multiplies by the float 1/1.1 rather than dividing by 1.1; the last bits differ, so do the same.
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# ---------------------------------------------------------------------------------------------
# Emphasis: "(a)", "[a]", "(a:1.3)", escapes and BREAK -> weighted text fragments
# ---------------------------------------------------------------------------------------------

_ESCAPABLE_CHARACTERS = "()[]\\"
_ATTENTION_SPECIAL_CHARACTERS = "\\()[]:"
# ":" + explicit weight + ")" closes the innermost "(". \s and \d are Unicode-aware on purpose:
# A1111 uses the same `re` classes, so "(a:\u0661.5)" is a weight there too.
_EXPLICIT_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*")


class _WeightedFragments:
    """The growing fragment list of parse_prompt_attention; weights change after fragments are added."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.weights: list[float] = []

    def __len__(self) -> int:
        return len(self.texts)

    def append(self, text: str, weight: float) -> None:
        self.texts.append(text)
        self.weights.append(weight)

    def append_plain_text(self, text: str) -> None:
        # BREAK is only looked for inside one plain-text token, as A1111 does: "(BREAK)" is
        # still found (then weighted), "BRE\\AK" is not.
        parts = _BREAK_KEYWORD.split(text)
        for index, part in enumerate(parts):
            if index > 0:
                self.append("BREAK", BREAK_MARKER_WEIGHT)
            self.append(part, 1.0)

    def multiply_from(self, start_index: int, multiplier: float) -> None:
        # One multiplication per closing bracket, in closing order: A1111's float results
        # (1.5730000000000004 rather than 1.573) depend on that order.
        for index in range(start_index, len(self.weights)):
            self.weights[index] *= multiplier

    def merged(self) -> list[tuple[str, float]]:
        if not self.texts:
            return [("", 1.0)]
        merged_texts = [self.texts[0]]
        merged_weights = [self.weights[0]]
        for text, weight in zip(self.texts[1:], self.weights[1:], strict=True):
            if weight == merged_weights[-1]:
                merged_texts[-1] += text
            else:
                merged_texts.append(text)
                merged_weights.append(weight)
        return [(text, float(weight)) for text, weight in zip(merged_texts, merged_weights, strict=True)]


def _explicit_weight(number_text: str, token: str) -> float:
    try:
        return float(number_text)
    except ValueError as error:
        # A1111 fails the whole generation here too (float() raises); say where the problem is.
        raise ValueError(f"invalid emphasis weight {number_text!r} in {token!r}") from error


def _plain_run_end(text: str, start: int, special_characters: str) -> int:
    end = start
    while end < len(text) and text[end] not in special_characters:
        end += 1
    return end


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) fragments exactly as A1111's parse_prompt_attention does.

    "(x)" multiplies by 1.1, "[x]" by 1/1.1, "(x:w)" by w; "\\(" "\\)" "\\[" "\\]" "\\\\" are literal
    characters and any other backslash is dropped; brackets still open at the end are closed
    there; an unmatched ")" or "]" is text; "BREAK" as a whole word gives ("BREAK", -1.0);
    neighbours of equal weight are merged. Raises ValueError for a weight float() cannot read,
    such as "(a:1.2.3)", where A1111 fails as well.
    """
    fragments = _WeightedFragments()
    open_round_starts: list[int] = []
    open_square_starts: list[int] = []
    position = 0
    while position < len(text):
        character = text[position]
        if character == "\\":
            escaped = text[position + 1 : position + 2]
            if escaped and escaped in _ESCAPABLE_CHARACTERS:
                fragments.append(escaped, 1.0)
                position += 2
            else:
                # A1111's tokenizer takes a lone backslash as an escape of nothing: it vanishes,
                # leaving an empty fragment behind.
                fragments.append("", 1.0)
                position += 1
        elif character == "(":
            open_round_starts.append(len(fragments))
            position += 1
        elif character == "[":
            open_square_starts.append(len(fragments))
            position += 1
        elif character == ":":
            weight_close = _EXPLICIT_WEIGHT_CLOSE.match(text, position)
            if weight_close is None:
                fragments.append_plain_text(":")
                position += 1
            elif open_round_starts:
                weight = _explicit_weight(weight_close.group(1), weight_close.group(0))
                fragments.multiply_from(open_round_starts.pop(), weight)
                position = weight_close.end()
            else:
                fragments.append_plain_text(weight_close.group(0))
                position = weight_close.end()
        elif character == ")":
            if open_round_starts:
                fragments.multiply_from(open_round_starts.pop(), ROUND_BRACKET_MULTIPLIER)
            else:
                fragments.append_plain_text(character)
            position += 1
        elif character == "]":
            if open_square_starts:
                fragments.multiply_from(open_square_starts.pop(), SQUARE_BRACKET_MULTIPLIER)
            else:
                fragments.append_plain_text(character)
            position += 1
        else:
            run_end = _plain_run_end(text, position, _ATTENTION_SPECIAL_CHARACTERS)
            fragments.append_plain_text(text[position:run_end])
            position = run_end

    # Unclosed brackets: every "(" first, outermost first, then every "[" (A1111's order).
    for start_index in open_round_starts:
        fragments.multiply_from(start_index, ROUND_BRACKET_MULTIPLIER)
    for start_index in open_square_starts:
        fragments.multiply_from(start_index, SQUARE_BRACKET_MULTIPLIER)
    return fragments.merged()


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation -> [(end_at_step, text), ...]
# ---------------------------------------------------------------------------------------------
#
# A1111 parses with a lark Earley grammar (spec b.2). What that grammar accepts, restated:
#   * top level: text, bracket groups, and stray "[", "]", "(", ")", ":" kept as literal text;
#   * a group's content contains no stray bracket, no "|" outside "[a|b]" and no extra ":", so a
#     group is valid exactly when its brackets pair up with valid groups inside it;
#   * "(p)" and "(p:p)" and "[p]" are kept verbatim (the encoder reads the emphasis later);
#   * "[p|p|...]" alternates; "[p:N]" and "[p:p:N]" edit at N (the text between the last ":"
#     and "]" must be a signed number, whitespace allowed around it);
#   * a "|" outside an alternation, or a backslash with nothing after it on its line, is a
#     parse error: the whole prompt is then used literally.
# Valid groups never overlap (their contents are balanced), so a single left-to-right pass with
# a stack finds them all: a group is reduced when its closer arrives, and when something makes
# the innermost open group invalid, every open group around it is invalid too (each contains
# the one inside), so they all turn back into literal text.
#
# Where lark has several parses, its pick is the first by rule order, and among equal orders the
# iteration order of a Python set, which depends on PYTHONHASHSEED. The rule order already makes
# lark prefer a group to stray characters in every case where the text differs, except one:
# an editing group closed right before further stray characters ("[a:b:3]]", "[a:3](b") may be
# parsed either way from one A1111 process to the next. This parser always takes the group.

_SCHEDULE_SPECIAL_CHARACTERS = "\\[]():|"
# lark's common.SIGNED_NUMBER; digits are ASCII only there (unlike the emphasis regex above).
_EDIT_STEP_LITERAL = re.compile(
    r"\s*(?P<number>[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*"
)


class _PromptSyntaxError(Exception):
    """The prompt is not in A1111's editing grammar; it is then used literally."""


@dataclass(frozen=True, slots=True)
class _Text:
    value: str


@dataclass(frozen=True, slots=True)
class _VerbatimGroup:
    """A "(p)", "(p:p)" or "[p]" group: kept as written, brackets included; inner edits still apply."""

    opener: str
    parts: tuple[tuple[_Node, ...], ...]
    separators: tuple[str, ...]
    closer: str


@dataclass(frozen=True, slots=True)
class _Edit:
    """[before:after:when] or [after:when] (before is None)."""

    before: tuple[_Node, ...] | None
    after: tuple[_Node, ...]
    when_literal: str


@dataclass(frozen=True, slots=True)
class _Alternation:
    options: tuple[tuple[_Node, ...], ...]


_Node = _Text | _VerbatimGroup | _Edit | _Alternation


@dataclass(slots=True)
class _OpenGroup:
    """A "(" or "[" whose closer has not been seen yet."""

    opener: str
    separators: list[str]
    parts: list[list[_Node]]
    # Source index where each part starts: the last part of an edit must be a bare number.
    part_starts: list[int]

    def accepts_separator(self, separator: str) -> bool:
        if self.opener == "(":
            return separator == ":" and not self.separators
        if separator == "|":
            return ":" not in self.separators
        return "|" not in self.separators and len(self.separators) < 2

    def add_separator(self, separator: str, next_part_start: int) -> None:
        self.separators.append(separator)
        self.parts.append([])
        self.part_starts.append(next_part_start)


def _closed_group(group: _OpenGroup, closer: str, prompt: str, closer_index: int) -> _Node | None:
    """The node a closed group stands for, or None when the group is not valid A1111 syntax."""
    if group.opener == "(":
        if closer != ")":
            return None
        return _verbatim_group(group, ")")
    if closer != "]":
        return None
    if not group.separators:
        return _verbatim_group(group, "]")
    if group.separators[0] == "|":
        return _Alternation(tuple(tuple(part) for part in group.parts))
    step_literal = _EDIT_STEP_LITERAL.fullmatch(prompt, group.part_starts[-1], closer_index)
    if step_literal is None:
        return None
    number = step_literal.group("number")
    if len(group.separators) == 1:
        return _Edit(None, tuple(group.parts[0]), number)
    return _Edit(tuple(group.parts[0]), tuple(group.parts[1]), number)


def _verbatim_group(group: _OpenGroup, closer: str) -> _VerbatimGroup:
    # One node rather than its content spliced into the parent: "[[[[...]]]]" stays linear.
    parts = tuple(tuple(part) for part in group.parts)
    return _VerbatimGroup(group.opener, parts, tuple(group.separators), closer)


def _verbatim_nodes(group: _VerbatimGroup) -> Iterator[_Node]:
    """The group in text order, its brackets and separators as _Text nodes."""
    yield _Text(group.opener)
    for index, part in enumerate(group.parts):
        if index > 0:
            yield _Text(group.separators[index - 1])
        yield from part
    yield _Text(group.closer)


def _dissolve_open_groups(open_groups: list[_OpenGroup], top_level: list[_Node]) -> None:
    """Turn every open group back into literal text at the top level, outermost first (text order)."""
    for group in open_groups:
        top_level.append(_Text(group.opener))
        for index, part in enumerate(group.parts):
            if index > 0:
                separator = group.separators[index - 1]
                if separator == "|":
                    raise _PromptSyntaxError("'|' outside an alternation")
                top_level.append(_Text(separator))
            top_level.extend(part)
    open_groups.clear()


def _parse_schedule_syntax(prompt: str) -> list[_Node]:
    top_level: list[_Node] = []
    open_groups: list[_OpenGroup] = []

    def current_nodes() -> list[_Node]:
        return open_groups[-1].parts[-1] if open_groups else top_level

    position = 0
    while position < len(prompt):
        character = prompt[position]
        if character == "\\":
            escaped = prompt[position + 1 : position + 2]
            # lark's plain text takes "\" plus any character but a newline; nothing else takes "\".
            if not escaped or escaped == "\n":
                raise _PromptSyntaxError(f"backslash with nothing to escape at {position}")
            current_nodes().append(_Text(prompt[position : position + 2]))
            position += 2
        elif character in "([":
            open_groups.append(_OpenGroup(character, [], [[]], [position + 1]))
            position += 1
        elif character in ":|":
            if open_groups and open_groups[-1].accepts_separator(character):
                open_groups[-1].add_separator(character, position + 1)
            else:
                _dissolve_open_groups(open_groups, top_level)
                if character == "|":
                    raise _PromptSyntaxError(f"'|' outside an alternation at {position}")
                top_level.append(_Text(character))
            position += 1
        elif character in ")]":
            closed = _closed_group(open_groups[-1], character, prompt, position) if open_groups else None
            if closed is None:
                _dissolve_open_groups(open_groups, top_level)
                top_level.append(_Text(character))
            else:
                open_groups.pop()
                current_nodes().append(closed)
            position += 1
        else:
            run_end = _plain_run_end(prompt, position, _SCHEDULE_SPECIAL_CHARACTERS)
            current_nodes().append(_Text(prompt[position:run_end]))
            position = run_end
    _dissolve_open_groups(open_groups, top_level)
    return top_level


def _edit_step(when_literal: str, steps: int) -> int:
    """The last step that still shows the "before" text (A1111 1.6+ rule, no hires pass)."""
    value = float(when_literal)
    if "." in when_literal:
        value = value * steps
    if math.isnan(value) or value == math.inf:
        # Only reachable with literals like 1e999, where A1111 itself crashes in int().
        return steps
    if value == -math.inf:
        return -1
    return min(steps, int(value))


def _walk(nodes: tuple[_Node, ...] | list[_Node]) -> Iterator[_Node]:
    # Explicit stack: a prompt may nest edits deeper than Python's recursion limit.
    pending: list[Iterator[_Node]] = [iter(nodes)]
    while pending:
        node = next(pending[-1], None)
        if node is None:
            pending.pop()
            continue
        yield node
        if isinstance(node, _VerbatimGroup):
            for part in node.parts:
                pending.append(iter(part))
        elif isinstance(node, _Edit):
            if node.before is not None:
                pending.append(iter(node.before))
            pending.append(iter(node.after))
        elif isinstance(node, _Alternation):
            for option in node.options:
                pending.append(iter(option))


def _render_at_step(nodes: list[_Node], step: int, steps: int) -> str:
    pieces: list[str] = []
    pending: list[Iterator[_Node]] = [iter(nodes)]
    while pending:
        node = next(pending[-1], None)
        if node is None:
            pending.pop()
        elif isinstance(node, _Text):
            pieces.append(node.value)
        elif isinstance(node, _VerbatimGroup):
            pending.append(_verbatim_nodes(node))
        elif isinstance(node, _Edit):
            branch = node.before if step <= _edit_step(node.when_literal, steps) else node.after
            if branch is not None:
                pending.append(iter(branch))
        else:
            pending.append(iter(node.options[(step - 1) % len(node.options)]))
    return "".join(pieces)


def get_prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt schedule of one prompt: [(end_at_step, text), ...] in step order.

    Same as get_learned_conditioning_prompt_schedules([prompt], steps)[0] in A1111 1.6+ with no
    hires pass: "[a:b:N]" switches after step N (an integer literal) or after int(N * steps)
    (a literal with a "."), clamped to steps; "[a|b]" changes option every step. The texts keep
    the emphasis syntax. A prompt outside the grammar is used literally: [(steps, prompt)].
    """
    try:
        nodes = _parse_schedule_syntax(prompt)
    except _PromptSyntaxError:
        return [(steps, prompt)]
    boundaries = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Edit):
            edit_step = _edit_step(node.when_literal, steps)
            if edit_step >= 1:
                boundaries.add(edit_step)
        elif isinstance(node, _Alternation):
            boundaries.update(range(1, steps + 1))
    return [(end_at_step, _render_at_step(nodes, end_at_step, steps)) for end_at_step in sorted(boundaries)]


def prompt_at_step(schedule: list[tuple[int, str]], step: int) -> str:
    """The text to condition on at `step` (A1111's 0-based denoiser-call counter).

    A1111's reconstruct_cond_batch rule: the first entry whose end_at_step >= step. When the step
    is past every entry (samplers that call the model more often than `steps`), A1111 falls back
    to the FIRST entry, not the last; this does the same so images match.
    """
    if not schedule:
        raise ValueError("empty prompt schedule")
    for end_at_step, text in schedule:
        if step <= end_at_step:
            return text
    return schedule[0][1]


# ---------------------------------------------------------------------------------------------
# Comments (A1111 1.10, option enable_prompt_comments, default on)
# ---------------------------------------------------------------------------------------------

# Two passes, in this order, each replacing its match by one newline. Without MULTILINE only the
# start of the text counts as a line start for the first pass, and a match eats the newline
# after it, so of several consecutive comment lines only every other one goes in the first pass;
# the second pass removes the rest. The resulting newline counts are A1111's.
_WHOLE_LINE_COMMENT = re.compile(r"(?:\A|\n)#.*(?:\n|\Z)")
_END_OF_LINE_COMMENT = re.compile(r"#.*(?:\n|\Z)")


def strip_comments(text: str) -> str:
    """Remove "#" comments as A1111 1.10 does: from "#" to the end of the line, newline included,
    each comment replaced by a single newline (so "a # c" becomes "a \\n")."""
    without_whole_lines = _WHOLE_LINE_COMMENT.sub("\n", text)
    return _END_OF_LINE_COMMENT.sub("\n", without_whole_lines)
