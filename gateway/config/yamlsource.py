"""YAML -> plain Python values plus the source line of every key and item.

PyYAML's composer gives nodes with marks; constructing the values ourselves
lets us remember where each mapping key and sequence item came from, so a
validation error located by a key path can be reported as ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
import yaml.constructor

Path_ = tuple[Any, ...]
_MAX_NODES = 100_000


class YamlSourceError(Exception):
    """A YAML syntax or structure problem, with a 1-based line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass
class YamlDocument:
    data: Any
    # key path -> 1-based line of that key (mappings) or item (sequences).
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, path: Path_) -> int:
        """Line of the longest prefix of ``path`` that exists in the document."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return self.lines.get((), 1)


class _Constructor(yaml.constructor.SafeConstructor):
    pass


def load_yaml(text: str) -> YamlDocument:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem:
            problem = f"{exc.problem} ({exc.context})"
        raise YamlSourceError(line, problem) from None
    except yaml.YAMLError as exc:  # pragma: no cover - non-marked errors are rare
        raise YamlSourceError(1, str(exc)) from None
    doc = YamlDocument(data=None)
    if root is None:
        doc.data = {}
        doc.lines[()] = 1
        return doc
    doc.lines[()] = root.start_mark.line + 1
    doc.data = _Builder(doc.lines).build(root, ())
    return doc


class _Builder:
    def __init__(self, lines: dict[Path_, int]) -> None:
        self._lines = lines
        self._scalars = _Constructor()
        self._open: set[int] = set()
        self._budget = _MAX_NODES
        self._explicit_keys: dict[int, set[int]] = {}

    def build(self, node: yaml.Node, path: Path_) -> Any:
        # Aliases are expanded; refuse self-referencing ones and alias bombs.
        self._budget -= 1
        if self._budget < 0:
            raise YamlSourceError(node.start_mark.line + 1, "document too large")
        if id(node) in self._open:
            raise YamlSourceError(node.start_mark.line + 1, "recursive alias")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        self._open.add(id(node))
        try:
            return self._collection(node, path)
        finally:
            self._open.discard(id(node))

    def _collection(self, node: yaml.Node, path: Path_) -> Any:
        if isinstance(node, yaml.MappingNode):
            # An aliased node is visited again already flattened: remember its own keys.
            explicit = self._explicit_keys.get(id(node))
            if explicit is None:
                explicit = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
                self._explicit_keys[id(node)] = explicit
                self._scalars.flatten_mapping(node)  # resolves "<<" merge keys, merged first
            result: dict[Any, Any] = {}
            seen_explicit: set[Any] = set()
            for key_node, value_node in node.value:
                key = self.build(key_node, path)
                if not isinstance(key, str | int | float | bool) and key is not None:
                    raise YamlSourceError(
                        key_node.start_mark.line + 1, "mapping keys must be plain scalars"
                    )
                if id(key_node) in explicit:
                    if key in seen_explicit:
                        raise YamlSourceError(
                            key_node.start_mark.line + 1, f"duplicate key {key!r}"
                        )
                    seen_explicit.add(key)
                child = (*path, key)
                self._lines[child] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, item_node in enumerate(node.value):
                child = (*path, index)
                self._lines[child] = item_node.start_mark.line + 1
                items.append(self.build(item_node, child))
            return items
        raise YamlSourceError(node.start_mark.line + 1, "unsupported YAML node")

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self._scalars.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark or node.start_mark
            raise YamlSourceError(mark.line + 1, exc.problem or "bad value") from None
