"""QoS profiles shared by every node of this package (the only place they are defined).

Why explicit profiles: a camera publisher, a robot controller and a late-joining instruction
publisher need different guarantees, and rclpy's default (reliable, depth 10) is wrong for at least
two of them.

- ``SENSOR_QOS``: cameras. Best effort, keep only the newest frame: a late frame is worthless and
  must never block the publisher; a reliable publisher still matches a best-effort subscription.
- ``COMMAND_QOS``: commands to the robot. Reliable, volatile, small queue: every command is
  delivered in order, but a subscriber that joins late does not get old commands.
- ``INSTRUCTION_QOS``: the language instruction. Reliable and transient-local (latched): a node that
  starts after the instruction was published still receives it. Publishers must use it too.
- ``DIAGNOSTIC_QOS``: decision messages and other diagnostics: reliable, queue of 10.
- ``RECORD_QOS``: the recorder's camera and state-input subscriptions: best effort like the sensor
  profile (matches any publisher), but a queue, so a 100 Hz /joint_states is recorded whole while the
  recorder's thread writes an image, and a sim running faster than real time loses no frame.
- ``RECORD_RELIABLE_QOS``: the recorder's (and the demo driver's) command and success subscriptions:
  reliable like the commands, with a queue deep enough for a sim stepping 100+ times a second while the
  subscriber's thread is busy for a while (a keep-last reader overwrites what it has not taken).
- ``CLOCK_QOS``: the sim's ``/clock``: reliable, which also matches rclpy's best-effort clock
  subscription (``use_sim_time``), with a deep history: a recorder maps reception times to sim time
  through every sample, and a keep-last writer would overwrite a jump a busy reader had not yet taken.
"""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

SENSOR_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.BEST_EFFORT,
    durability=DurabilityPolicy.VOLATILE,
)
"""Camera subscriptions (and publishers in the sim bridge / tests): newest frame only."""

COMMAND_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=10,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
"""Robot commands: reliable, never replayed to late joiners."""

INSTRUCTION_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)
"""Instruction topic (std_msgs/String): latched, so a late node still gets the current task."""

DIAGNOSTIC_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=10,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
"""Decision messages and other per-step diagnostics."""

RECORD_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=100,
    reliability=ReliabilityPolicy.BEST_EFFORT,
    durability=DurabilityPolicy.VOLATILE,
)
"""Recording cameras and state topics: every message kept (best effort matches reliable and best-effort publishers)."""

RECORD_RELIABLE_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=200,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
"""Recording commands and success (and /clock samples): reliable, every message kept."""

CLOCK_QOS = RECORD_RELIABLE_QOS
"""``/clock`` (rosgraph_msgs/Clock) published by ``sim_node`` with ``publish_clock``: the recording profile
(reliable, deep), so the writer keeps every sample a busy recorder has not yet taken."""
