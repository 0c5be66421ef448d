"""Stream frames from the library into your own loop.

    python examples/stream_api.py

Loads the embedded SCD model, encodes the example prompt, and handles each generated frame the
moment it exists (here: prints its latency and mean brightness, and keeps it).
"""

from pathlib import Path

import numpy as np
import torch

from scd.actions import parse_actions
from scd.checkpoints import load_model
from scd.mp4 import write_video
from scd.sampling import stream
from scd.video import fit_frames, frames_to_tensor, read_video, tensor_to_frames

HERE = Path(__file__).parent

loaded = load_model()  # the embedded model; or load_model("owner/repo@rev"), load_model("path/to/folder")
config = loaded.config

clip = read_video(HERE / "world_prompt.mp4")
prompt_actions = parse_actions(HERE / "world_prompt.actions.txt", config.action_names, config.num_classes)
next_actions = parse_actions(HERE / "world_next.actions.txt", config.action_names, config.num_classes)
frames = 12
context = loaded.encode(frames_to_tensor(fit_frames(clip.frames, config.frame_size)))[None]  # (1, F, C, H, W)
actions = torch.tensor(prompt_actions + next_actions[:frames])

generated = []
for frame in stream(loaded.model, context, frames, config.default_steps, conditions=actions, seed=0):
    image = tensor_to_frames(loaded.decode(frame.latents))[0]  # (H, W, 3) uint8
    generated.append(image)
    print(f"frame {frame.index}: {frame.latency_ms:6.1f} ms "
          f"(context {frame.context_ms:.1f}, denoise {frame.denoise_ms:.1f}), brightness {image.mean():.1f}")

write_video(HERE.parent / "stream_api.mp4", np.stack(generated), fps=config.fps)
