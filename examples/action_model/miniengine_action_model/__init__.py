"""An action-conditioned video-token world model, brought to miniengine as a plugin package.

A video is a stream of frames, each frame a grid of image tokens (from some image tokenizer) followed by a
few action tokens. Each action token's embedding is a learned projection of a small action vector (say a
steering angle, a throttle and a brake), carried beside the prompt as an extra input. The model predicts
the image tokens of the next frame, given every frame and action so far:

    frame 0                      frame 1                      frame 2
    [ image tokens | A A ]       [ image tokens | A A ]       [ image tokens ...      A: action placeholder
      given          actions 0     generated      actions 1     generated

Generation runs frame by frame (video.py): request t's prompt is everything so far plus the next actions'
placeholders, so the prefix cache hands back the K/V of the earlier frames and only the new tokens are
computed. reference.py is the same network in plain torch, generating the transformers way (a loop over a
growing KV cache); the engine's greedy frames equal its frames token for token.
"""

from __future__ import annotations

from miniengine import ModelRegistry

ARCHITECTURE = "ActionWorldModel"


def register() -> None:
    """The general plugin (entry point `action_model`): every miniengine process runs it once."""
    ModelRegistry.register_model(ARCHITECTURE, "miniengine_action_model.model:ActionWorldModel")


__all__ = ["ARCHITECTURE", "register"]
