"""pip path: `pip install .` gives the ROS-free library (core/, data/) and console scripts.

The ROS 2 face (msg/, srv/, `ros2 run`/`ros2 launch`) is built by colcon from package.xml and
CMakeLists.txt instead; both paths install the same Python package. rclpy is deliberately NOT in
install_requires (it is not a PyPI package of that name; ROS installs provide it): the ros/ entry
points exit with a clear message when it is missing.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
PACKAGE = "q_transformer_ros"


def package_version() -> str:
    """Single source of truth for the version: package.xml (colcon reads it too)."""
    match = re.search(r"<version>\s*([^<\s]+)\s*</version>", (ROOT / "package.xml").read_text())
    if match is None:
        raise RuntimeError(f"{ROOT / 'package.xml'}: no <version> element")
    return match.group(1)


def share_files(folder: str) -> list[tuple[str, list[str]]]:
    """Install config/ and launch/ to <prefix>/share/q_transformer_ros/<folder>, as colcon does."""
    base = ROOT / folder
    if not base.is_dir():
        return []
    files = [p for p in sorted(base.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    by_dir: dict[str, list[str]] = {}
    for p in files:
        rel = p.relative_to(ROOT)
        by_dir.setdefault(f"share/{PACKAGE}/{rel.parent.as_posix()}", []).append(rel.as_posix())
    return sorted(by_dir.items())


setup(
    name=PACKAGE,
    version=package_version(),
    description="Q-Transformer for ROS 2 robots: policy node, rosbag converter, offline RL trainer",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    include_package_data=False,
    data_files=[(f"share/{PACKAGE}", ["package.xml"]), *share_files("config"), *share_files("launch")],
    install_requires=[
        "torch",
        "torchvision",
        "einops>=0.8",
        "open_clip_torch>=3.0",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "rosbags>=0.10",
        "rosbags-image>=0.10",
        "tensorboard",
    ],
    extras_require={"sim": ["metaworld==3.1.1", "imageio"], "test": ["pytest", "pytest-timeout"],
                    "serve": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
                    "lerobot": ["pyarrow>=15", "av>=15,<16"]},
    entry_points={
        "console_scripts": [
            # Same names as `ros2 run q_transformer_ros <name>` (lib/q_transformer_ros/ on the colcon path).
            "train = q_transformer_ros.cli:train",
            "convert_bag = q_transformer_ros.cli:convert_bag",
            "lerobot_import = q_transformer_ros.cli:lerobot_import",
            "lerobot_export = q_transformer_ros.cli:lerobot_export",
            "record = q_transformer_ros.cli:record",
            "policy_node = q_transformer_ros.cli:policy_node",
            "sim_node = q_transformer_ros.cli:sim_node",
            "expert_node = q_transformer_ros.cli:expert_node",
            "demo = q_transformer_ros.cli:demo",
        ],
    },
    zip_safe=False,
)
