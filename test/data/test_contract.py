"""The robot contract: parsing, validation messages, binning and the embedded-copy round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from q_transformer_ros.contract import ContractError, RobotContract, load_contract, parse_contract

CONFIG = Path(__file__).resolve().parents[2] / "config"


@pytest.fixture(params=sorted(CONFIG.glob("contract_*.yaml")), ids=lambda p: p.stem)
def contract_path(request) -> Path:
    return request.param


@pytest.fixture
def ee_dict() -> dict:
    return yaml.safe_load((CONFIG / "contract_ee_arm.yaml").read_text())


def test_shipped_contracts_load_and_round_trip(contract_path: Path) -> None:
    contract = load_contract(contract_path)
    again = RobotContract.from_dict(contract.to_dict())
    assert again == contract
    assert again.fingerprint() == contract.fingerprint()
    # YAML text round trip too (what datasets and checkpoints embed).
    assert parse_contract(yaml.safe_load(contract.to_yaml())) == contract


def test_contract_nested_under_key(tmp_path: Path, ee_dict: dict) -> None:
    p = tmp_path / "robot.yaml"
    p.write_text(yaml.safe_dump({"contract": ee_dict, "other": 1}))
    assert load_contract(p).name == "ee_arm"


def test_bins_round_trip_lands_in_same_bin(ee_dict: dict) -> None:
    contract = parse_contract(ee_dict)
    rng = np.random.default_rng(0)
    actions = rng.uniform(contract.action_low, contract.action_high, size=(1000, contract.num_action_dims))
    bins = contract.actions_to_bins(actions)
    assert bins.min() >= 0 and (bins < np.array(contract.action_bins)).all()
    centres = contract.bins_to_actions(bins)
    # a bin centre is at most half a bin width from the action it came from
    width = (contract.action_high - contract.action_low) / np.array(contract.action_bins)
    assert np.all(np.abs(centres - actions) <= width / 2 + 1e-6)
    np.testing.assert_array_equal(contract.actions_to_bins(centres), bins)


def test_out_of_range_actions_clip_to_edge_bins(ee_dict: dict) -> None:
    contract = parse_contract(ee_dict)
    bins = contract.actions_to_bins(np.array([[-5.0, 5.0, -1.0, 1.0]]))
    np.testing.assert_array_equal(bins, [[0, 31, 0, 31]])


def test_wrong_action_width_is_named(ee_dict: dict) -> None:
    contract = parse_contract(ee_dict)
    with pytest.raises(ValueError, match="3 dims.*has 4"):
        contract.actions_to_bins(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="out of range"):
        contract.bins_to_actions(np.array([0, 0, 0, 32]))


@pytest.mark.parametrize(
    "mutate, key, value",
    [
        (lambda d: d["cameras"][0].update(msg_type="sensor_msgs/msg/PointCloud2"), "cameras[0].msg_type", "PointCloud2"),
        (lambda d: d["cameras"][0].update(height=3), "cameras[0].height", "3"),
        (lambda d: d["cameras"][0].update(topic="not a topic"), "cameras[0].topic", "not a topic"),
        (lambda d: d["action_dims"][1].update(low=2.0), "action_dims[1].low/high", "2.0"),
        (lambda d: d["action_dims"][2].update(bins=1), "action_dims[2].bins", "1"),
        (lambda d: d["action_dims"][0]["source"].update(field="twist..x"), "action_dims[0].source.field", "twist..x"),
        (lambda d: d["action_dims"][0]["target"].update(msg_type="std_msgs/msg/String"), "action_dims[0].target.msg_type", "String"),
        (lambda d: d["action_dims"][3].update(name="dx"), "action_dims[3].name", "dx"),
        (lambda d: d.update(frame_history=0), "frame_history", "0"),
        (lambda d: d.update(discount=1.5), "discount", "1.5"),
        (lambda d: d.update(stop_behaviour="brake"), "stop_behaviour", "brake"),
        (lambda d: d.update(instruction={"topic": None}), "instruction", "None"),
        (lambda d: d.update(success={"topic": None}), "success", "None"),
        (lambda d: d["cameras"][0].update(colour="red"), "cameras[0].colour", "red"),
        (lambda d: d.pop("action_dims"), "action_dims", "missing"),
    ],
)
def test_validation_errors_name_file_key_and_value(tmp_path: Path, ee_dict: dict, mutate, key: str, value: str) -> None:
    bad = copy.deepcopy(ee_dict)
    mutate(bad)
    path = tmp_path / "bad_contract.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ContractError) as info:
        load_contract(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert value in message


def test_unreadable_and_invalid_yaml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="missing.yaml"):
        load_contract(tmp_path / "missing.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("cameras: [\n")
    with pytest.raises(ContractError, match="broken.yaml.*not valid YAML"):
        load_contract(p)


def test_compatibility_check(ee_dict: dict) -> None:
    base = parse_contract(ee_dict)
    rebinned = copy.deepcopy(ee_dict)
    rebinned["action_dims"][0]["bins"] = 64
    other = parse_contract(rebinned)
    base.check_compatible(other, what="dataset", where="/data/x")  # re-binning is allowed
    with pytest.raises(ContractError, match="range/bins differ"):
        base.check_compatible(other, what="checkpoint", where="/ckpt", allow_rebin=False)
    moved = copy.deepcopy(ee_dict)
    moved["cameras"][0]["height"] = 96
    with pytest.raises(ContractError, match=r"/data/y: dataset .*cameras differ"):
        base.check_compatible(parse_contract(moved), what="dataset", where="/data/y")
    assert base.fingerprint() != other.fingerprint()
