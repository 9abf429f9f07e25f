"""Parameters the way every node of this package declares them, and contract topic names.

- Every parameter is declared with its value, type and description (so ``ros2 param dump`` and
  ``ros2 param get`` show it, empty string lists included) and read-only unless the node honours a
  change at run time: ``ros2 param set`` on a read-only parameter is refused instead of answering
  "successful" and changing nothing.
- One syntax for mappings given as string lists: ``'key:=value'`` items.
- Contract topics are resolved relative to the node's namespace, so two robots run side by side
  (``namespace:=robot1``): ``/camera/front/image_raw`` becomes ``/robot1/camera/front/image_raw``;
  in the root namespace nothing changes.
"""

from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
          float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING}


def declare(node: Node, name: str, default: Any, description: str, *, read_only: bool = True,
            dynamic_typing: bool = False) -> None:
    """Declare ``name`` with ``default`` (bool, int, float, str or a list of str) and a description.

    A list default is declared as a string array with that value even when empty (rclpy would make an
    empty list a byte array, or leave the parameter "not set")."""
    if isinstance(default, list):
        descriptor = ParameterDescriptor(name=name, type=ParameterType.PARAMETER_STRING_ARRAY,
                                         description=description, read_only=read_only)
        node.declare_parameter(name, Parameter.Type.STRING_ARRAY, descriptor)
        if param(node, name) is None:  # no override given: set the default
            # set through the internal path: a read-only parameter cannot be set from outside
            node._parameters[name] = Parameter(name, Parameter.Type.STRING_ARRAY, [str(x) for x in default])
        return
    kind = ParameterType.PARAMETER_NOT_SET if dynamic_typing else _TYPES[type(default)]
    node.declare_parameter(name, default, ParameterDescriptor(
        name=name, type=kind, description=description, read_only=read_only, dynamic_typing=dynamic_typing))


def param(node: Node, name: str) -> Any:
    """The parameter's value (None for an uninitialised one)."""
    try:
        return node.get_parameter(name).value
    except ParameterUninitializedException:
        return None


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``['front:=/cam', 'wrist:=/cam2']`` -> ``{'front': '/cam', 'wrist': '/cam2'}``; errors name the
    parameter and the item."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = str(item).partition(":=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"parameter '{what}': item {item!r} is not of the form 'key:=value'")
        out[key.strip()] = value.strip()
    return out


def contract_topic(topic: str) -> str:
    """A contract topic as the node subscribes or publishes it: relative, so it resolves in the node's
    namespace (``/robot1`` + ``/camera/image`` -> ``/robot1/camera/image``). Private (``~/``) names and
    names already relative are kept."""
    return topic if topic.startswith("~") else topic.lstrip("/")
