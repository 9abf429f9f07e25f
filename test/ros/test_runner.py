"""``spin_node``: how an executable's node ends (tests without DDS traffic: one node, its own context)."""

from __future__ import annotations

import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from q_transformer_ros.ros.runner import spin_node  # noqa: E402


class _Publisher(Node):
    """A timer callback that publishes; ``shutdown_first`` shuts the context down inside the callback,
    as a signal arriving while the callback runs does."""

    def __init__(self, context: Context, shutdown_first: bool) -> None:
        super().__init__("runner_test_node", context=context)
        self.shutdown_first = shutdown_first
        self.pub = self.create_publisher(String, "runner_test", 1)
        self.create_timer(0.01, self._on_timer)

    def _on_timer(self) -> None:
        if self.shutdown_first:
            rclpy.shutdown(context=self.context)
        self.pub.publish(String(data="x"))
        if not self.shutdown_first:
            raise ValueError("a real bug in a callback")


def _spin(shutdown_first: bool) -> int:
    context = Context()
    rclpy.init(context=context, domain_id=0)
    try:
        return spin_node(lambda: _Publisher(context, shutdown_first), "runner_test_node",
                         SingleThreadedExecutor(context=context))
    finally:
        rclpy.try_shutdown(context=context)


def test_a_publish_cut_off_by_shutdown_ends_the_node_quietly() -> None:
    assert _spin(shutdown_first=True) == 0


def test_a_callback_error_while_running_still_raises() -> None:
    with pytest.raises(ValueError, match="a real bug"):
        _spin(shutdown_first=False)
