"""Meta-World task names -> one fixed English instruction each.

Why a fixed sentence per task: the policy is conditioned on language, and the sim bridge publishes
the instruction of the running task so that recorder, converter and policy node all see the same
text. The sentences say what a person would ask for, not how the robot does it, and each one is
different, so that a multi-task policy can tell tasks apart from the instruction alone.
"""

from __future__ import annotations

TASK_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the block from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-close-v3": "turn the faucet off",
    "faucet-open-v3": "turn the faucet on",
    "hammer-v3": "hammer the nail into the wall",
    "hand-insert-v3": "put the block into the hole",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "pick-out-of-hole-v3": "pick the block out of the hole",
    "pick-place-v3": "pick up the block and place it at the goal",
    "pick-place-wall-v3": "pick up the block and place it behind the wall",
    "plate-slide-back-side-v3": "slide the plate back into the goal from the side",
    "plate-slide-back-v3": "slide the plate back into the goal",
    "plate-slide-side-v3": "slide the plate into the goal from the side",
    "plate-slide-v3": "slide the plate into the goal",
    "push-back-v3": "push the block back to the goal",
    "push-v3": "push the block to the goal",
    "push-wall-v3": "push the block past the wall to the goal",
    "reach-v3": "reach the goal",
    "reach-wall-v3": "reach the goal behind the wall",
    "shelf-place-v3": "put the block on the shelf",
    "soccer-v3": "kick the ball into the goal",
    "stick-pull-v3": "pull the container with the stick",
    "stick-push-v3": "push the container with the stick",
    "sweep-into-v3": "sweep the block into the hole",
    "sweep-v3": "sweep the block off the table",
    "window-close-v3": "close the window",
    "window-open-v3": "open the window",
}
"""Every Meta-World v3 task (the 50 of MT50) -> its instruction sentence."""

MT10_TASKS: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)
"""The MT10 task set (Meta-World's ten-task multi-task benchmark)."""

DEMO_TASKS: tuple[str, ...] = ("drawer-open-v3", "button-press-topdown-v3", "drawer-close-v3")
"""Tasks the scripted expert solves in 100 % of seeds, even with noise std 0.5, within ~100 steps,
with objects large enough to see at 64x64: the end-to-end demo's default set."""


def instruction_for(task_name: str) -> str:
    """The instruction sentence of ``task_name``; a KeyError lists the known tasks."""
    try:
        return TASK_INSTRUCTIONS[task_name]
    except KeyError:
        raise KeyError(
            f"unknown Meta-World task {task_name!r}; known tasks: {sorted(TASK_INSTRUCTIONS)}"
        ) from None


def task_for_instruction(instruction: str) -> str:
    """Inverse lookup: the task whose instruction is ``instruction`` (exact text)."""
    for task, text in TASK_INSTRUCTIONS.items():
        if text == instruction:
            return task
    raise KeyError(f"no Meta-World task has the instruction {instruction!r}")
