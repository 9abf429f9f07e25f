"""Write rosbag2 bags (MCAP or sqlite3) with rosbags, atomically: a temp directory renamed on close.

Used by the recorder (it writes the CDR bytes rclpy hands it, unchanged) and by tests and benchmarks
(which serialize rosbags message objects). The result has the standard metadata.yaml, so stock
rosbag2 tools read it, and the converter reads it like any other bag.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer
from rosbags.rosbag2.writer import WriterError

from q_transformer_ros.data.bag_reader import BagError, typestore_for


class BagWriter:
    """A rosbag2 bag being written; nothing appears at ``path`` until ``close()`` succeeds.

    ``storage``: ``'mcap'`` or ``'sqlite3'``; ``compression``: None, ``'file'`` or ``'message'`` (zstd).
    """

    def __init__(self, path: str | Path, storage: str = "mcap", compression: str | None = None, version: int = 9) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise BagError(f"{self.path}: exists already, not overwriting a bag")
        plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
        if storage not in plugins:
            raise BagError(f"{self.path}: storage {storage!r} unknown, use one of {sorted(plugins)}")
        modes = {None: CompressionMode.NONE, "file": CompressionMode.FILE, "message": CompressionMode.MESSAGE}
        if compression not in modes:
            raise BagError(f"{self.path}: compression {compression!r} unknown, use one of {list(modes)}")
        self.typestore = typestore_for(None)
        # write into <parent>/.<name>.tmp-<pid>/<name> so the storage file gets the bag's name
        self._tmp_parent = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self._tmp_parent.exists():
            shutil.rmtree(self._tmp_parent)
        self._tmp_parent.mkdir(parents=True)
        self._tmp = self._tmp_parent / self.path.name
        self._writer = Writer(self._tmp, version=version, storage_plugin=plugins[storage])
        if compression is not None:
            self._writer.set_compression(modes[compression], CompressionFormat.ZSTD)
        self._writer.open()
        self._conns: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.closed = False

    def add_topic(self, topic: str, msgtype: str) -> None:
        if topic in self._conns:
            return
        try:
            self._conns[topic] = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
        except (WriterError, KeyError) as e:
            raise BagError(f"{self.path}: cannot add topic {topic} ({msgtype}): {e}") from e
        self.counts[topic] = 0

    def write_raw(self, topic: str, time_ns: int, cdr: bytes | memoryview) -> None:
        """Write already CDR-serialized bytes (what rclpy delivers with ``raw=True``)."""
        if topic not in self._conns:
            raise BagError(f"{self.path}: topic {topic} was not added before writing")
        self._writer.write(self._conns[topic], int(time_ns), cdr)
        self.counts[topic] += 1

    def write(self, topic: str, time_ns: int, msg: Any) -> None:
        """Serialize a rosbags message object of the topic's type and write it."""
        msgtype = self._conns[topic].msgtype if topic in self._conns else None
        if msgtype is None:
            raise BagError(f"{self.path}: topic {topic} was not added before writing")
        self.write_raw(topic, time_ns, self.typestore.serialize_cdr(msg, msgtype))

    def set_custom_data(self, key: str, value: str) -> None:
        self._writer.set_custom_data(key, str(value))

    def close(self) -> Path:
        """Finish the bag (metadata.yaml) and move it to ``path``."""
        if self.closed:
            return self.path
        self._writer.close()
        os.replace(self._tmp, self.path)
        self._tmp_parent.rmdir()
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written; ``path`` stays absent."""
        if self.closed:
            return
        try:
            self._writer.abort()
        finally:
            shutil.rmtree(self._tmp_parent, ignore_errors=True)
            self.closed = True

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
