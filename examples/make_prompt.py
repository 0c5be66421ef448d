"""Make the sample prompt: 8 frames of a held-out synthetic-world clip, its actions, and the actions
of the 24 frames that follow (for `scd generate --actions`).

The clip (held-out seed 1e9 + 1101, outside the 64 clips `scd eval` scores) was picked among 120
held-out clips as one where the embedded SCD model keeps the agent within 2 px for all 24 frames
while it moves in all four directions: a demo of what the model does when it works. Over the 64
evaluation clips the current model keeps the agent in 92% of clips at frame 16 (its model card has the
numbers), and on this one in all 24 frames.

    python examples/make_prompt.py        # writes examples/world_prompt.mp4 and the action files
"""

from pathlib import Path

from scd import world
from scd.mp4 import write_video

HERE = Path(__file__).parent
PROMPT, NEXT = 8, 24

frames, actions = world.render_clip(world.HELDOUT_SEED_START + 1101, PROMPT + NEXT)
write_video(HERE / "world_prompt.mp4", frames[:PROMPT], fps=8)
(HERE / "world_prompt.actions.txt").write_text("\n".join(world.ACTIONS[a] if a < 4 else "none" for a in actions[:PROMPT]) + "\n")
(HERE / "world_next.actions.txt").write_text("\n".join(world.ACTIONS[a] if a < 4 else "none" for a in actions[PROMPT:]) + "\n")
write_video(HERE / "world_truth.mp4", frames, fps=8)  # the ground truth continuation, for comparison
