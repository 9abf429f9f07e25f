"""Open recorded bags of any kind with rosbags, with errors that name the bag.

Handles rosbag2 directories (metadata.yaml; sqlite3 or MCAP; split into several files; zstd file or
message compression), single ``.mcap`` / ``.db3`` files and ROS 1 ``.bag`` files. Message types come
from the definitions stored in the bag; bags without them (old sqlite3 bags) fall back to the typestore
of the bag's ROS distro with this package's own ``msg/`` definitions registered on top.

Why a wrapper: rosbags raises several unrelated exception types (sqlite3, zstd, struct, its own) for
broken files, some only half-way through reading; the converter needs one ``BagError`` that says which
bag broke and how, so nothing is written for a bad input.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

PACKAGE_NAME = "q_transformer_ros"
MSG_DIR = Path(__file__).resolve().parents[2] / "msg"
BAG_FILE_SUFFIXES = (".mcap", ".db3", ".bag")


class BagError(ValueError):
    """A bag that cannot be read or does not fit the contract; the message names the bag (and topic/field)."""


@lru_cache(maxsize=16)
def typestore_for(distro: str | None = None, ros1: bool = False) -> Typestore:
    """The typestore of ``distro`` (``'humble'``, ``'kilted'``, ...) with this package's msg/ types.

    Unknown or missing distros use ROS 2 Kilted (ROS 1 Noetic for ``.bag`` files)."""
    if ros1:
        store = get_typestore(Stores.ROS1_NOETIC)
    else:
        name = f"ros2_{(distro or '').strip().lower()}"
        known = {s.value: s for s in Stores}
        store = get_typestore(known.get(name, Stores.ROS2_KILTED))
    store.register(own_message_types())
    return store


@lru_cache(maxsize=1)
def own_message_types() -> dict[str, Any]:
    """This package's msg/ definitions as rosbags types (``q_transformer_ros/msg/Decision`` ...)."""
    types: dict[str, Any] = {}
    if MSG_DIR.is_dir():
        for path in sorted(MSG_DIR.glob("*.msg")):
            types.update(get_types_from_msg(path.read_text(), f"{PACKAGE_NAME}/msg/{path.stem}"))
    return types


def find_bags(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand command-line inputs into bag paths, in a stable order.

    A directory with metadata.yaml is one bag (possibly split over several files); a ``.mcap``,
    ``.db3`` or ``.bag`` file is one bag; any other directory is searched (recursively) for bags.
    """
    bags: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise BagError(f"{path}: no such bag (file or directory)")
        if path.is_dir() and (path / "metadata.yaml").exists():
            bags.append(path)
        elif path.is_file():
            if path.suffix not in BAG_FILE_SUFFIXES and not path.name.endswith((".mcap.zstd", ".db3.zstd")):
                raise BagError(f"{path}: not a bag file (expected one of {BAG_FILE_SUFFIXES} or a rosbag2 directory)")
            bags.append(path)
        elif path.is_dir():
            found = _search_dir(path)
            if not found:
                raise BagError(f"{path}: directory holds no bags (no metadata.yaml, .mcap, .db3 or .bag files)")
            bags.extend(found)
    seen: set[Path] = set()
    unique = []
    for b in bags:
        key = b.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(b)
    return unique


def _search_dir(root: Path) -> list[Path]:
    out: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.is_dir():
            if (child / "metadata.yaml").exists():
                out.append(child)
            else:
                out.extend(_search_dir(child))
        elif child.suffix in BAG_FILE_SUFFIXES:
            out.append(child)
    return out


def bag_name(path: Path) -> str:
    """Short name of a bag used in labels files and reports: the directory or file name without suffix."""
    name = path.name
    for suffix in (".zstd", ".mcap", ".db3", ".bag"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class BagInfo:
    """What a bag holds, read once on open."""

    path: Path
    topics: dict[str, str]
    """Topic -> message type."""
    counts: dict[str, int]
    """Topic -> number of messages."""
    start_ns: int
    end_ns: int
    """Time of the last message (inclusive)."""
    message_count: int
    distro: str | None
    custom_data: dict[str, str]

    content_digest: str = ""
    """sha256 over the first message of every topic (filled by ``BagReader.open``)."""

    def identity(self) -> str:
        """A stable id of the bag's content, independent of where it lives on disk.

        sha256 over the topics with their types and counts, the first/last message time and the bytes
        of each topic's first message: the same recording copied or moved keeps its id (so re-running
        a conversion does not duplicate it), while two simulator runs with identical timing differ.
        """
        blob = json.dumps(
            {
                "topics": sorted((t, self.topics[t], self.counts.get(t, 0)) for t in self.topics),
                "start": self.start_ns,
                "end": self.end_ns,
                "count": self.message_count,
                "content": self.content_digest,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def describe_topics(self) -> str:
        return ", ".join(f"{t} ({self.topics[t]}, {self.counts.get(t, 0)} msgs)" for t in sorted(self.topics)) or "none"


class BagReader:
    """One opened bag: topic info, filtered time-ordered reading, deserialization; errors name the bag.

    Not thread-safe (neither is rosbags' reader): open one per worker process.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: AnyReader | None = None
        self.info: BagInfo | None = None

    def __enter__(self) -> "BagReader":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        ros1 = self.path.suffix == ".bag"
        distro = _metadata_distro(self.path)
        self.unreadable: dict[str, str] = {}
        """topic -> why its type definition in the bag cannot be parsed (the topic is left out)."""
        with self._wrap_open():
            reader = AnyReader([self.path], default_typestore=typestore_for(distro, ros1))
            for sub in getattr(reader, "readers", []):
                _skip_unparseable_definitions(sub, self.unreadable)
            reader.open()
        self._reader = reader
        topics = {name: (info.msgtype or "?") for name, info in reader.topics.items()}
        counts = {name: int(info.msgcount) for name, info in reader.topics.items()}
        total = int(reader.message_count)
        if total == 0:
            self.close()
            raise BagError(f"{self.path}: bag is empty (0 messages; topics: {', '.join(sorted(topics)) or 'none'})")
        custom: dict[str, str] = {}
        for sub in getattr(reader, "readers", []):
            meta = getattr(sub, "metadata", None)
            if meta is not None and getattr(meta, "custom", None):
                custom.update({str(k): str(v) for k, v in meta.custom.items()})
        self.info = BagInfo(
            path=self.path,
            topics=topics,
            counts=counts,
            start_ns=int(reader.start_time),
            end_ns=int(reader.end_time) - 1,
            message_count=total,
            distro=distro,
            custom_data=custom,
            content_digest=self._content_digest(sorted(topics)),
        )

    def _content_digest(self, topics: list[str]) -> str:
        h = hashlib.sha256()
        for topic in topics:
            for _, t, raw in self.messages([topic]):
                h.update(topic.encode())
                h.update(str(t).encode())
                h.update(bytes(raw))
                break
        return h.hexdigest()

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:
                pass
            self._reader = None

    @contextmanager
    def _wrap_open(self) -> Iterator[None]:
        """Errors when opening: say what is known (an unsupported format is not a corrupt file)."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001
            text = str(e) or type(e).__name__
            if "Serialization format" in text:
                raise BagError(f"{self.path}: unsupported serialization format: {text} The converter reads rosbag2 "
                               f"bags in 'cdr' (what ros2 bag record writes) and ROS 1 bags; re-record or convert "
                               f"this bag to cdr") from e
            if "Profile is not ros2" in text:
                raise BagError(f"{self.path}: an MCAP file whose profile is not 'ros2' (written by a non-ROS "
                               f"tool?); the converter reads ROS 2 MCAP bags") from e
            raise BagError(f"{self.path}: cannot open bag (truncated, corrupt or not a bag?): "
                           f"{type(e).__name__}: {text}") from e

    @contextmanager
    def _wrap(self, what: str, topic: str | None = None) -> Iterator[None]:
        try:
            yield
        except BagError:
            raise
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # rosbags, sqlite3, zstd, struct, lz4 ... errors for broken files
            where = f"{self.path}" + (f" topic {topic}" if topic else "")
            detail = str(e) or type(e).__name__
            raise BagError(f"{where}: {what}: {type(e).__name__}: {detail}") from e

    @property
    def reader(self) -> AnyReader:
        if self._reader is None:
            raise BagError(f"{self.path}: bag is not open")
        return self._reader

    def require_topic(self, topic: str, msg_types: Sequence[str], role: str) -> None:
        """Fail unless ``topic`` is in the bag with one of ``msg_types``; the error lists the bag's topics."""
        assert self.info is not None
        if topic not in self.info.topics and topic in getattr(self, "unreadable", {}):
            raise BagError(f"{self.path}: {role} topic {topic}: its message definition in the bag cannot be "
                           f"parsed ({self.unreadable[topic]})")
        if topic not in self.info.topics:
            raise BagError(
                f"{self.path}: {role} topic {topic} is not in the bag; the bag has: {self.info.describe_topics()}"
            )
        have = self.info.topics[topic]
        if have not in msg_types:
            raise BagError(
                f"{self.path}: {role} topic {topic} has message type {have}, the contract expects "
                f"{' or '.join(msg_types)}"
            )

    def messages(self, topics: Sequence[str], start_ns: int | None = None) -> Iterator[tuple[str, int, Any]]:
        """Yield ``(topic, time_ns, raw_bytes)`` for ``topics`` in time order (bag receive time)."""
        conns = [c for c in self.reader.connections if c.topic in set(topics)]
        if not conns:
            return
        it = self.reader.messages(connections=conns, start=start_ns)
        current = None
        while True:
            with self._wrap("cannot read messages (truncated or corrupt file?)", current):
                try:
                    conn, t, raw = next(it)
                except StopIteration:
                    return
            current = conn.topic
            yield conn.topic, int(t), raw

    def first_time(self, topic: str, start_ns: int | None = None) -> int | None:
        """Time of the first message on ``topic`` at or after ``start_ns`` (reads one message)."""
        for _, t, _ in self.messages([topic], start_ns):
            return t
        return None

    def deserialize(self, raw: Any, topic: str) -> Any:
        assert self.info is not None
        msgtype = self.info.topics[topic]
        with self._wrap(f"cannot deserialize a {msgtype} message", topic):
            return self.reader.deserialize(raw, msgtype)


def _definition_problem(connection: Any) -> str | None:
    """Why rosbags cannot parse a connection's stored message definition (None: it can, or there is none)."""
    msgdef = getattr(connection, "msgdef", None)
    fmt = getattr(getattr(msgdef, "format", None), "name", "NONE")
    try:
        if fmt == "MSG":
            get_types_from_msg(msgdef.data, connection.msgtype)
        elif fmt == "IDL":
            sep = "=" * 80 + "\n"
            parts = msgdef.data.split(sep)[1:] if msgdef.data.startswith(f"{sep}IDL: ") else [msgdef.data]
            for part in parts:
                get_types_from_idl(part.split("\n", 1)[1] if part.startswith("IDL: ") else part)
    except Exception as e:  # noqa: BLE001 - rosbags raises several kinds for definitions it cannot read
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"{connection.msgtype}: {first[:200]}"
    return None


def _skip_unparseable_definitions(sub_reader: Any, unreadable: dict[str, str]) -> None:
    """Make a rosbag2 sub-reader leave out connections whose stored definition rosbags cannot parse.

    Why: rosbags' AnyReader registers the types of every connection when it opens, so one topic the
    contract does not even name (a service-event topic, ``.../srv/X_Event``, whose schema rosbag2's MCAP
    writer stores in a form rosbags does not parse) stops the whole bag from opening. Such topics are
    dropped here, recorded in ``unreadable``, and named if the contract needs one of them."""
    original_open = sub_reader.open

    def open_and_filter() -> None:
        original_open()
        connections = getattr(getattr(sub_reader, "storage", None), "connections", None)
        if not isinstance(connections, list):
            return
        keep = []
        for c in connections:
            problem = _definition_problem(c)
            if problem is None:
                keep.append(c)
            else:
                unreadable[c.topic] = problem
        connections[:] = keep

    sub_reader.open = open_and_filter


def _metadata_distro(path: Path) -> str | None:
    """The ``ros_distro`` recorded in a rosbag2 metadata.yaml, if any (cheap regex, no full parse)."""
    meta = path / "metadata.yaml" if path.is_dir() else None
    if meta is None or not meta.exists():
        return None
    m = re.search(r"^\s*ros_distro:\s*['\"]?([A-Za-z0-9_]+)", meta.read_text(errors="replace"), re.MULTILINE)
    return m.group(1) if m else None
