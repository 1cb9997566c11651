"""Generating videos with miniengine, frame by frame.

Frame t+1 of every video is one request, all videos' requests batched together. Its prompt is the video
so far plus the placeholders of the actions that lead to the next frame; the actions themselves go
beside it as the extra input "actions", one row per placeholder in the prompt (all actions so far):

    request t   prompt  [frame 0 | A..A | frame 1 | A..A | ... | frame t | A..A]     max_tokens = one frame
                actions [   actions[0]  ,    actions[1]  , ... ,  actions[t]  ]      rows in prompt order

Everything before frame t's actions was in request t-1, with the same actions, so its full KV blocks come
back from the prefix cache: only the new frame's tail, the new actions and the new frame are computed.
"""

from __future__ import annotations

import torch

from miniengine import Engine, SamplingParams


def generate_videos(engine: Engine, first_frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Greedy frames [B, F, tokens_per_frame] after `first_frames` [B, tokens_per_frame], frame t+1 following
    `actions[:, t]` ([B, F, actions_per_frame, action_dim], float32)."""
    config = engine.hf_config
    batch, num_frames, per_frame, action_dim = actions.shape
    placeholders = [config.action_token_id] * per_frame
    videos = [frame.tolist() for frame in first_frames]
    params = SamplingParams(temperature=0, max_tokens=config.tokens_per_frame, ignore_eos=True)
    frames = []
    for t in range(num_frames):
        prompts = []
        for b, video in enumerate(videos):
            video += placeholders
            rows = actions[b, : t + 1].reshape(-1, action_dim)
            prompts.append({"prompt_token_ids": list(video), "extra_inputs": {"actions": rows}})
        outputs = engine.generate(prompts, params, use_tqdm=False)
        new = [out.outputs[0].token_ids for out in outputs]
        for video, frame in zip(videos, new):
            video += frame
        frames.append(torch.tensor(new))
    return torch.stack(frames, dim=1)
