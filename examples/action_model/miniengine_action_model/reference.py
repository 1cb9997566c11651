"""The world model in plain torch, straight from its checkpoint tensors: the reference the engine must equal.

It generates the way a transformers-style implementation does: all videos in one batch (they share one
token layout, so nothing is padded), a KV cache per layer that grows by `torch.cat`, one forward pass for
each new frame's prompt tokens and then one per generated token. Nothing of miniengine is used: not its
layers, kernels, paging or scheduling.

    for each frame t:   forward([last image token of frame t, A action placeholders]) -> first token
                        forward(token) x (tokens_per_frame - 1)                      -> the rest of frame t+1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ReferenceWorldModel:
    def __init__(self, config: dict, weights: dict[str, torch.Tensor], device="cpu", dtype=torch.float32) -> None:
        self.c = config
        self.w = {name: t.to(device, dtype) for name, t in weights.items()}
        self.device, self.dtype = torch.device(device), dtype
        self.heads, self.kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config["hidden_size"] // self.heads
        self.frame_len = config["tokens_per_frame"] + config["actions_per_frame"]
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float().to(self.device)
        self.inv_freq = 1.0 / (config["rope_theta"] ** (dims / self.head_dim))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"])
        return weight * h.to(x.dtype)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, D], rotated by each position's angles (the two halves of a head as pairs)."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor | None, start: int, cache: list) -> torch.Tensor:
        """Logits of the last token of each video. tokens [B, T] at positions start.., actions [B, k, dim]
        (one row per action placeholder in `tokens`), cache: a list of (k, v) per layer, extended here."""
        w, (batch, length) = self.w, tokens.shape
        positions = torch.arange(start, start + length, device=self.device)
        x = w["tok_embeddings.weight"][tokens]
        placeholders = tokens == self.c["action_token_id"]
        if actions is not None:
            projected = actions.reshape(-1, actions.shape[-1]).to(self.dtype) @ w["action_proj.weight"].T
            x[placeholders] = projected + w["action_proj.bias"]
        x = (
            x
            + w["pos_embed.spatial"][positions % self.frame_len]
            + w["pos_embed.temporal"][positions // self.frame_len]
        )
        for i in range(self.c["num_hidden_layers"]):
            p = f"layers.{i}."
            h = self._norm(x, w[p + "attention_norm.weight"])
            q = (h @ w[p + "attention.wq.weight"].T).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
            k = (h @ w[p + "attention.wk.weight"].T).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = (h @ w[p + "attention.wv.weight"].T).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, positions), self._rope(k, positions)
            if len(cache) <= i:
                cache.append((k, v))
            else:
                cache[i] = (torch.cat((cache[i][0], k), dim=2), torch.cat((cache[i][1], v), dim=2))
            keys, values = cache[i]
            # Query j (at position start + j) sees every cached key up to its own position.
            mask = torch.arange(keys.shape[2], device=self.device)[None, :] <= positions[:, None]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            x = x + out.transpose(1, 2).reshape(batch, length, -1) @ w[p + "attention.wo.weight"].T
            h = self._norm(x, w[p + "ffn_norm.weight"])
            gate, up = h @ w[p + "feed_forward.w1.weight"].T, h @ w[p + "feed_forward.w3.weight"].T
            x = x + (F.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
        return self._norm(x[:, -1], w["norm.weight"]) @ w["output.weight"].T

    @torch.inference_mode()
    def generate(self, first_frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Greedy frames [B, F, tokens_per_frame] after `first_frames` [B, tokens_per_frame], frame t+1
        conditioned on `actions[:, t]` ([B, F, actions_per_frame, action_dim])."""
        batch, num_frames = actions.shape[:2]
        placeholders = torch.full((batch, self.c["actions_per_frame"]), self.c["action_token_id"], device=self.device)
        new = torch.cat((first_frames.to(self.device), placeholders), dim=1)
        cache: list = []
        start, frames = 0, []
        for t in range(num_frames):
            logits = self.forward(new, actions[:, t].to(self.device), start, cache)
            start += new.shape[1]
            frame = [logits.argmax(-1)]
            for _ in range(self.c["tokens_per_frame"] - 1):
                logits = self.forward(frame[-1][:, None], None, start, cache)
                start += 1
                frame.append(logits.argmax(-1))
            frames.append(torch.stack(frame, dim=1))
            new = torch.cat((frame[-1][:, None], placeholders), dim=1)  # its last token is not in the cache yet
        return torch.stack(frames, dim=1)
