"""A small QOM tree answering ``qom-list``, ``qom-get`` and ``qom-set`` as QEMU 7.2 does.

Only the objects reclaimd walks exist (the root, ``/objects`` with the RAM backend, ``/machine``
with its peripheral containers and the balloon). Path lookup follows ``object_resolve_path``:
absolute paths walk children from the root; a relative path matches any object whose path
ends with it, if exactly one does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from daemon.simguest.wire import QMPError, generic

Getter = Callable[[], Any]
Setter = Callable[[Any], None]


@dataclass
class Prop:
    """One property. ``owner`` names the object type in QEMU's messages (aliases differ)."""

    name: str
    type: str
    get: Getter | None = None
    set: Setter | None = None
    owner: str | None = None


@dataclass
class QOMObject:
    type_name: str
    props: list[Prop] = field(default_factory=list)
    children: dict[str, QOMObject] = field(default_factory=dict)
    path: str = ""

    def prop(self, name: str) -> Prop | None:
        for p in self.props:
            if p.name == name:
                return p
        child = self.children.get(name)
        if child is not None:
            return Prop(name, f"child<{child.type_name}>", get=lambda: child.path)
        return None

    def listing(self) -> list[dict[str, str]]:
        """``qom-list``: ``type`` first, then the properties and children in creation order."""
        entries = [{"name": "type", "type": "string"}]
        entries += [{"name": p.name, "type": p.type} for p in self.props]
        entries += [{"name": n, "type": f"child<{c.type_name}>"} for n, c in self.children.items()]
        return entries

    def get(self, name: str) -> Any:
        if name == "type":
            return self.type_name
        p = self._need(name)
        if p.get is None:
            raise generic(f"Property '{p.owner or self.type_name}.{name}' is not readable")
        return p.get()

    def set(self, name: str, value: Any) -> None:
        if name == "type":
            raise generic(f"Property '{self.type_name}.type' is not writable")
        p = self._need(name)
        if p.set is None:
            raise generic(f"Property '{p.owner or self.type_name}.{name}' is not writable")
        p.set(value)

    def _need(self, name: str) -> Prop:
        p = self.prop(name)
        if p is None:
            raise generic(f"Property '{self.type_name}.{name}' not found")
        return p


def container() -> QOMObject:
    return QOMObject("container")


class QOMTree:
    def __init__(self, root: QOMObject) -> None:
        self.root = root
        self._fix_paths(root, "")

    def add(self, parent_path: str, name: str, obj: QOMObject) -> None:
        parent = self.resolve(parent_path)
        parent.children[name] = obj
        self._fix_paths(obj, f"{parent.path.rstrip('/')}/{name}")

    def _fix_paths(self, obj: QOMObject, path: str) -> None:
        obj.path = path or "/"
        for name, child in obj.children.items():
            self._fix_paths(child, f"{path}/{name}")

    def resolve(self, path: str) -> QOMObject:
        found = self._absolute(path) if path.startswith("/") else self._partial(path)
        if found is None:
            raise QMPError("DeviceNotFound", f"Device '{path}' not found")
        return found

    def _absolute(self, path: str) -> QOMObject | None:
        obj = self.root
        for part in path.split("/")[1:]:
            if not part:
                continue
            child = obj.children.get(part)
            if child is None:
                return None
            obj = child
        return obj

    def _partial(self, path: str) -> QOMObject | None:
        if not path:
            return None
        suffix = "/" + path.strip("/")
        matches = [obj for obj in self._walk(self.root) if obj.path.endswith(suffix)]
        return matches[0] if len(matches) == 1 else None

    def _walk(self, obj: QOMObject) -> Iterator[QOMObject]:
        yield obj
        for child in obj.children.values():
            yield from self._walk(child)


def static(name: str, type_: str, value: Any, *, device: str | None, owner: str) -> Prop:
    """A qdev property: readable; after realize any write fails with QEMU's message."""
    who = f"device '{device}'" if device else "anonymous device"

    def refuse(_value: Any) -> None:
        raise generic(
            f"Attempt to set property '{name}' on {who} (type '{owner}') after it was realized"
        )

    return Prop(name, type_, get=lambda: value, set=refuse, owner=owner)


def read_only(name: str, type_: str, value: Any, owner: str | None = None) -> Prop:
    return Prop(name, type_, get=lambda: value, owner=owner)
